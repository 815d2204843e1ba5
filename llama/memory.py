"""Know before you run: memory per GPU (or per process) for weights and KV cache.

    python -m llama.memory --ckpt_dir CodeLlama-7b/ --max_seq_len 100000 --max_batch_size 1 [--mp 1] [--quantize int8|int4]

The estimate needs only params.json, or a Hugging Face config.json (and tokenizer.model for the
vocabulary size, else 32016), or a GGUF file's metadata; for a hub id (owner/name) only those files
are fetched. A quantized checkpoint's params.json says its scheme; --quantize estimates quantizing
as it loads.
"""

import argparse
from pathlib import Path
from typing import Dict, Optional

import torch

from llama import hub
from llama.checkpoint import read_params
from llama.cli import reports_user_errors
from llama.files import read_json
from llama.hf import read_config, tied_embeddings
from llama.gguf import GGUFWeightReader
from llama.loading import finer_projections, gguf_file, grid_group, model_args
from llama.model import ModelArgs
from llama.prefix_cache import default_budget_bytes
from llama.quantization import (
    GROUP_SIZES,
    MODES,
    Scheme,
    declared_scheme,
    input_widths,
    quantized_bytes,
    resolve_scheme,
)
from llama.tokenizer import Tokenizer

GiB = 2**30


def weight_bytes(args: ModelArgs, mp: int, bytes_per_param: int, scheme: Optional[Scheme] = None,
                 tied: bool = False) -> int:
    """Bytes of one model-parallel rank's weights (norms are replicated, the rest split); with a
    quantization scheme, the projections as its kernels hold them. tied: the output layer is the
    embedding, one tensor on one process (split two ways, by columns and by rows, on several)."""
    d, hd, f, v = args.dim, args.head_dim, args.ffn_hidden_dim, args.vocab_size
    replicated = (2 * args.n_layers + 1) * d
    tables = 1 if tied and mp == 1 else 2  # the embedding and the output layer
    if scheme is None:
        per_layer = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2 + 3 * d * f
        return ((tables * v * d + args.n_layers * per_layer) // mp + replicated) * bytes_per_param
    shapes = {"wq": (args.n_heads * hd // mp, d), "wk": (args.n_kv_heads * hd // mp, d),
              "wv": (args.n_kv_heads * hd // mp, d), "wo": (d, args.n_heads * hd // mp), "w1": (f // mp, d),
              "w2": (d, f // mp), "w3": (f // mp, d)}
    per_layer = sum(quantized_bytes(n, k, scheme) for n, k in shapes.values())
    held = [(shapes[key.split(".")[3]], scheme.for_key(key)) for key in scheme.int8]  # held in int8
    finer = sum(quantized_bytes(*shape, own) - quantized_bytes(*shape, scheme) for shape, own in held)
    return (tables * v * d // mp + replicated) * bytes_per_param + args.n_layers * per_layer + finer


def kv_cache_bytes(args, batch_size: int, seq_len: int, mp: int, bytes_per_value: int) -> int:
    """Bytes of one rank's KV cache for batch_size rows of seq_len positions."""
    return 2 * args.n_layers * batch_size * (args.n_kv_heads // mp) * seq_len * args.head_dim * bytes_per_value


def working_bytes(args, batch_size: int, mp: int, chunk: int, bytes_per_value: int) -> int:
    """A rough bound on the transient tensors of a prefill chunk (activations, attention mask, logits)."""
    rows = batch_size * chunk
    activations = rows * (4 * args.dim + 3 * args.ffn_hidden_dim // mp) * bytes_per_value
    return activations + batch_size * args.vocab_size * 4


def estimate(ckpt_dir: str, max_seq_len: int, max_batch_size: int, mp: int, dtype: str, chunk: int = 2048,
             quantize: Optional[str] = None, group_size: Optional[int] = None) -> Dict[str, int]:
    """Bytes per process of weights, KV cache and working tensors (see main); quantize, group_size:
    as Llama.build takes them."""
    folder = Path(hub.resolve(ckpt_dir, weights=False))  # a hub id: its config and tokenizer only
    vocab, grids, tied = 32016, None, False
    if (folder / "tokenizer.model").is_file():
        vocab = Tokenizer(str(folder / "tokenizer.model")).n_words
    path = gguf_file(str(folder)) if folder.exists() else None
    if path is not None:  # llama.cpp's one file: its metadata, and the rows of its embedding
        reader = GGUFWeightReader(path, 0, 1)
        params, where, vocab, grids = reader.params(), str(path), reader.vocab_rows(), grid_group(reader)
        tied = reader.tied
    elif (folder / "config.json").is_file() and not (folder / "params.json").is_file():  # Hugging Face's layout
        params, where = read_config(folder), str(folder / "config.json")
        vocab = read_json(folder / "config.json").get("vocab_size", vocab)
        tied = tied_embeddings(folder)
    else:
        params, where = read_params(folder), str(folder / "params.json")
    args = model_args(params, vocab, max_seq_len, max_batch_size, where)
    scheme = resolve_scheme(quantize, group_size, declared_scheme(params, where), input_widths(args, mp), where,
                            grids)
    if path is not None and scheme is not None:
        scheme = finer_projections(scheme, reader)
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return {
        "weights": weight_bytes(args, mp, size, scheme, tied),
        "kv_cache": kv_cache_bytes(args, max_batch_size, max_seq_len, mp, size),
        "working": working_bytes(args, max_batch_size, mp, min(chunk, max_seq_len), size),
    }


@reports_user_errors("python -m llama.memory")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--max_seq_len", type=int, required=True, help="prompt + answer, in tokens")
    parser.add_argument("--max_batch_size", type=int, default=1)
    parser.add_argument("--mp", type=int, default=1, help="model-parallel processes (GPUs)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quantize", choices=MODES, default=None,
                        help="projections quantized as they load (a quantized checkpoint says its own)")
    parser.add_argument("--group_size", type=int, choices=GROUP_SIZES, default=None, help="int4's group size")
    a = parser.parse_args(argv)
    est = estimate(a.ckpt_dir, a.max_seq_len, a.max_batch_size, a.mp, a.dtype, quantize=a.quantize,
                   group_size=a.group_size)
    total = sum(est.values())
    print(f"per GPU (model-parallel degree {a.mp}, {a.dtype}, {a.max_batch_size} x {a.max_seq_len} tokens):")
    print(f"  weights   {est['weights'] / GiB:8.2f} GiB")
    print(f"  KV cache  {est['kv_cache'] / GiB:8.2f} GiB  (grows with the requests; this is the most they can need)")
    print(f"  working   {est['working'] / GiB:8.2f} GiB  (a prefill chunk's activations and logits, roughly)")
    print(f"  total     {total / GiB:8.2f} GiB")
    print(f"  + prefix cache {default_budget_bytes(est['kv_cache']) / GiB:.2f} GiB as llama.server keeps by default "
          "(--prefix_cache_mb; the library keeps none unless asked)")
    if torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(0).total_memory
        verdict = "fits" if total < 0.95 * capacity else "does NOT fit"
        print(f"{torch.cuda.get_device_name(0)} has {capacity / GiB:.1f} GiB: {verdict}")


if __name__ == "__main__":
    main()
