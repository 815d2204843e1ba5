"""Attention of one new token over a KV cache on the CPU: the project's kernel (llama/attention.c,
through `llama.attention.attend`) against PyTorch's `scaled_dot_product_attention`, per call.

    python benchmarks/attention.py                 # the study model's heads and SmolLM2's, float32
    python benchmarks/attention.py --dtype bfloat16

Shapes: one row, one query token, H query heads sharing H_kv KV heads of dimension 64 (the study
model of benchmarks/generate.py: 16 and 4; SmolLM2-135M: 9 and 3), the cache a view of a 4096-position
buffer as the model holds it, S positions in use. Each cell is the median of --repeat timings of
--calls calls, the two kernels alternating; both answers are compared first.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import attention, native  # noqa: E402

HEADS = {"study model": (16, 4), "SmolLM2-135M": (9, 3)}
LENGTHS = (16, 64, 256, 1024, 4096)


def timed(f, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    a = parser.parse_args()
    if not native.available():
        sys.exit(f"the project's kernels cannot serve here: {native.why_not()}")
    dtype = getattr(torch, a.dtype)
    print(f"{a.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| heads (H / H_kv) | positions | PyTorch SDPA (us) | this package (us) | speed-up |")
    print("|---|---|---|---|---|")
    for name, (h, hkv) in HEADS.items():
        cache_k, cache_v = (torch.randn(1, hkv, 4096, 64).to(dtype) for _ in range(2))
        for s in LENGTHS:
            q = torch.randn(1, 1, h, 64).to(dtype)
            keys, values = cache_k[:, :, :s], cache_v[:, :, :s]
            last = torch.tensor([[s - 1]])
            ours = lambda: attention.attend(q, keys, values, None, False, last)  # noqa: E731
            sdpa = lambda: attention.attend(q, keys, values, None, False, None)  # noqa: E731
            torch.testing.assert_close(ours(), sdpa(), rtol=2e-2, atol=2e-2)
            times = {"sdpa": [], "ours": []}
            for _ in range(a.repeat):
                times["sdpa"].append(timed(sdpa, a.calls))
                times["ours"].append(timed(ours, a.calls))
            t_sdpa, t_ours = (statistics.median(times[k]) * 1e6 for k in ("sdpa", "ours"))
            print(f"| {name} ({h} / {hkv}) | {s} | {t_sdpa:.1f} | {t_ours:.1f} | {t_sdpa / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
