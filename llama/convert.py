"""Convert between Meta's checkpoint layout and Hugging Face's, and to llama.cpp's GGUF.

    python -m llama.convert to-hf SRC_DIR DST_DIR            # Meta -> config.json + model*.safetensors
    python -m llama.convert to-meta SRC_DIR DST_DIR --mp M   # Hugging Face -> M consolidated.NN.pth
    python -m llama.convert to-gguf SRC_DIR DST.gguf [--type f32|f16|bf16|q8_0]   # either -> one GGUF file

Tensors are converted one at a time from memory-mapped files, with a progress bar; the Meta and
Hugging Face copies keep the weights' dtype. The Hugging Face copy loads with transformers'
LlamaForCausalLM.from_pretrained, with tokenizer.json, tokenizer_config.json and
generation_config.json made from tokenizer.model (llama/hf_tokenizer.py) for AutoTokenizer and
GenerationConfig; the GGUF file (weights, hyper-parameters and tokenizer.model's vocabulary) runs in
llama.cpp. SRC_DIR may be a Hugging Face hub id (owner/name, llama/hub.py).
"""

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

from safetensors.torch import save_file
from tqdm import tqdm

from llama.cli import reports_user_errors
from llama.files import copy_if_present, refuse_output_files
from llama.gguf_export import FILE_TYPES, write_gguf
from llama.hf import hf_config, hf_name, meta_to_hf_tensor
from llama.hf_tokenizer import copy_tokenizer_files, tokenizer_files, write_json
from llama.loading import model_args, open_checkpoint, resolve_checkpoint
from llama.quantization import refuse_quantized
from llama.reshard import reshard


def to_hf(src: str, dst: str, shard_bytes: int = 5 * 2**30, show_progress: bool = True) -> Path:
    """Write the checkpoint in `src` (Meta's layout, any number of shards) in Hugging Face's layout
    into `dst`: config.json, model-0000i-of-0000N.safetensors with their index, tokenizer.model,
    and the tokenizer.json, tokenizer_config.json and generation_config.json made from it
    (llama.hf_tokenizer)."""
    src = resolve_checkpoint(src)
    src_dir, dst_dir = Path(src), Path(dst)
    params, reader = open_checkpoint(src, 0, 1)
    refuse_quantized(params, str(src_dir / "params.json"), "converting to Hugging Face's layout")
    refuse_output_files(dst_dir, ".safetensors")
    args = model_args(params, reader.vocab_rows(), 16384, 1, str(src_dir))
    config = hf_config(args)
    # Built and checked against sentencepiece before any weight is written.
    tokenizer = (tokenizer_files(src_dir / "tokenizer.model", config["max_position_embeddings"])
                 if (src_dir / "tokenizer.model").is_file() else {})
    keys = [k for k in reader.keys() if hf_name(k) is not None]  # e.g. rope.freqs has no use there
    dtype = reader.read(keys[0]).dtype
    # Plan the files first: their names say how many there are.
    files: List[List[str]] = [[]]
    size = total = 0
    for key in keys:
        n = math.prod(reader.shape(key)) * dtype.itemsize
        if files[-1] and size + n > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(key)
        size += n
        total += n
    dst_dir.mkdir(parents=True, exist_ok=True)
    weight_map: Dict[str, str] = {}
    with tqdm(total=len(keys), unit="tensor", desc=f"{reader.describe()} -> Hugging Face",
              disable=None if show_progress else True) as bar:
        for i, group in enumerate(files):
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            tensors = {}
            for key in group:
                tensors[hf_name(key)] = meta_to_hf_tensor(key, reader.read(key), args).contiguous().clone()
                weight_map[hf_name(key)] = name
                bar.update()
            save_file(tensors, str(dst_dir / name), metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_if_present(src_dir, dst_dir, "tokenizer.model")
    for name, content in tokenizer.items():
        write_json(dst_dir / name, content)
    if not tokenizer:
        copy_tokenizer_files(src_dir, dst_dir)
    return dst_dir


@reports_user_errors("python -m llama.convert")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    hf = sub.add_parser("to-hf", help="Meta's layout -> Hugging Face's (config.json, model*.safetensors)")
    hf.add_argument("src_dir")
    hf.add_argument("dst_dir")
    hf.add_argument("--shard_size_gb", type=float, default=5.0, help="largest .safetensors file (default 5)")
    meta = sub.add_parser("to-meta", help="Hugging Face's layout -> Meta's (consolidated.NN.pth, params.json)")
    meta.add_argument("src_dir")
    meta.add_argument("dst_dir")
    meta.add_argument("--mp", type=int, default=1, help="model-parallel shards to write (default 1)")
    gg = sub.add_parser("to-gguf", help="either layout -> one GGUF file for llama.cpp (weights and vocabulary)")
    gg.add_argument("src_dir", help="checkpoint folder with its tokenizer.model")
    gg.add_argument("dst_file", help="the .gguf file to write (must not exist)")
    gg.add_argument("--type", default="f32", choices=list(FILE_TYPES),
                    help="type of the weight matrices (default f32; norms stay f32)")
    a = parser.parse_args(argv)
    if a.direction == "to-hf":
        out = to_hf(a.src_dir, a.dst_dir, shard_bytes=int(a.shard_size_gb * 2**30))
    elif a.direction == "to-gguf":
        out = write_gguf(a.src_dir, a.dst_file, a.type)
    else:
        out = reshard(a.src_dir, a.dst_dir, a.mp)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
