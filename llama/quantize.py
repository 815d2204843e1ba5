"""Write a copy of a checkpoint with its projections quantized (int8, or int4), in Meta's layout.

    python -m llama.quantize --ckpt_dir SRC --out DST --mode int8|int4 [--group_size G]

SRC is a full-precision checkpoint: Meta's layout (any number of shards), Hugging Face's, or a GGUF
file (whose tensors are dequantized first; for int4 in groups of 32, its default, the projections a
GGUF stores on 4-bit grids, Q4_0, Q4_1 and Q4_K, keep them: llama.quantization.from_grids; those it
stores with more bits are held in int8, listed in params.json: loading.finer_projections). DST gets
as many consolidated.NN.pth shards as SRC has (one for the other layouts), each projection (wq wk
wv wo w1 w2 w3) as its values, one a byte, beside its bfloat16 `.scale` (and, int4, `.zero`),
everything else as SRC stores it; params.json with the scheme under "quantization"; SRC's tokenizer
files (a GGUF file's vocabulary written out as tokenizer.model, or tokenizer.json and
tokenizer_config.json); a fresh checklist.chk. Llama.build loads DST quantized, memory-mapped, on
any number of processes whose slices the int4 groups do not cross. Tensors are read one at a time
from the memory-mapped source; memory use peaks at about one output shard.
"""

import argparse
import functools
import json
from pathlib import Path
from typing import Dict, Optional

import torch

from llama.checkpoint import ShardReader
from llama.cli import reports_user_errors
from llama.files import copy_if_present, refuse_output_files, write_checklist
from llama.loading import (
    WeightReader,
    check_degree,
    checkpoint_folder,
    finer_projections,
    grid_group,
    model_args,
    open_checkpoint,
    params_file,
    resolve_checkpoint,
    stored_grids,
)
from llama.parallel import shard_dim
from llama.quantization import (
    MODES,
    PARAMS_KEY,
    Scheme,
    as_state,
    choose_scheme,
    input_widths,
    is_projection,
    quantize,
    refuse_quantized,
    row_absmax,
)
from llama.reshard import compact, write_shards
from llama.vocabulary import load_tokenizer, save_tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def quantized_state(key: str, tensor: torch.Tensor, scheme: Scheme, absmax: Dict[str, torch.Tensor],
                    source: WeightReader) -> Dict[str, torch.Tensor]:
    """What a quantized checkpoint stores for one rank's part of tensor `key`: a projection's values,
    scale (and zero), taken as `source` stores them where it holds the scheme's 4-bit grids (a GGUF
    file's, loading.stored_grids; `source` then reads the one shard written); any other tensor as it
    is. absmax: int8 row maxima of split rows, by key."""
    if is_projection(key):
        held = scheme.for_key(key)
        return as_state(key, stored_grids(source, key, held) or quantize(tensor, held, absmax.get(key)))
    return compact(key, tensor)


def quantize_checkpoint(src: str, dst: str, mode: str, group_size: Optional[int] = None,
                        show_progress: bool = True) -> Path:
    """Write the full-precision checkpoint `src` with its projections quantized by `mode` ("int8",
    "int4" in groups of `group_size` input columns, by default 32 for a GGUF file of 4-bit blocks,
    else the largest of 128, 64, 32 that fits) into the folder `dst`, in Meta's layout; returns dst."""
    src = resolve_checkpoint(src)
    src_dir, dst_dir = checkpoint_folder(src), Path(dst)
    params, whole = open_checkpoint(src, 0, 1)
    refuse_quantized(params, str(params_file(src)), "quantizing")
    if dst_dir.exists() and dst_dir.resolve() == src_dir.resolve():
        raise ValueError("--out must differ from --ckpt_dir")
    refuse_output_files(dst_dir, ".pth")
    shards = len(whole.paths) if isinstance(whole, ShardReader) else 1
    args = model_args(params, whole.vocab_rows(), 1, 1, str(params_file(src)))
    check_degree(args, shards)
    scheme = choose_scheme(mode, group_size, input_widths(args, shards), grid_group(whole))
    scheme = finer_projections(scheme, whole)
    # A row-parallel layer's rows are split over the shards; int8 scales each whole row.
    absmax = {k: row_absmax(whole.read(k)) for k in whole.keys()
              if shards > 1 and is_projection(k) and scheme.for_key(k).mode == "int8" and shard_dim(k) == 1}
    dst_dir.mkdir(parents=True, exist_ok=True)
    convert = functools.partial(quantized_state, scheme=scheme, absmax=absmax, source=whole)
    write_shards(src, dst_dir, shards, f"{whole.describe()} -> {scheme.describe()}", show_progress, convert)
    (dst_dir / "params.json").write_text(json.dumps({**params, PARAMS_KEY: scheme.to_json()}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        copy_if_present(src_dir, dst_dir, name)
    if params_file(src).suffix == ".gguf":  # its vocabulary is inside the file: write it out
        save_tokenizer(load_tokenizer(None, src), dst_dir)
    write_checklist(dst_dir)
    return dst_dir


@reports_user_errors("python -m llama.quantize")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True, help="full-precision checkpoint (folder, or .gguf file)")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--mode", required=True, choices=MODES, help="int8: a scale per output row; int4: per group")
    parser.add_argument("--group_size", type=int, default=None,
                        help="int4: input columns per scale and zero, 32, 64, 128 or 256 (default: 32 for a GGUF "
                             "file of 4-bit blocks, whose grids it keeps; else the largest of 128, 64, 32 that "
                             "divides every projection's input width)")
    a = parser.parse_args(argv)
    out = quantize_checkpoint(a.ckpt_dir, a.out, a.mode, a.group_size)
    scheme = json.loads((out / "params.json").read_text())[PARAMS_KEY]
    print(f"wrote {out} ({', '.join(f'{k} {v}' for k, v in scheme.items())})")


if __name__ == "__main__":
    main()
