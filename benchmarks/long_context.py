"""Peak memory and prefill time against prompt length: this package beside the reference's prefill.

    python benchmarks/long_context.py                      # CPU: a small model, 1k to 32k tokens
    python benchmarks/long_context.py --shape 7b --device cuda --dtype bfloat16 --lengths 16384 100000

Each (system, length) runs in a fresh process that builds the model and prefills one prompt:
- this package: generate(prompt, max_gen_len=1): chunked prefill, only the last position's logits;
- the reference's algorithm: one forward over the whole prompt with a square (L x L) float32 mask
  built on the host, (heads x L x L) scores materialised and softmaxed in float32 per layer, and the
  logits of every position in float32. It is skipped where its own arithmetic says it cannot fit.
Peak memory: the process's peak resident set (VmHWM, reset after the build) above what it held
before the prefill, or the CUDA allocator's peak above the weights.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "cpu": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32016),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32016, multiple_of=256),
}

CHILD = r"""
import json, math, sys, time
sys.path.insert(0, {root!r})
import torch
from llama import Llama
from llama.model import apply_rotary, rotary_cos_sin
system, ckpt, length, device, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
gen = Llama.build(ckpt, ckpt + "/tokenizer.model", max(length + 8, 64), 1, device=device, dtype=dtype)
model = gen.model
dev = torch.device(device)

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

def reset_peak():  # returns the memory in use now
    if dev.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident set restarts from now
    return status("VmRSS")

def peak():
    return torch.cuda.max_memory_allocated() if dev.type == "cuda" else status("VmHWM")

@torch.inference_mode()
def reference_prefill(tokens):
    L = tokens.shape[1]
    p = model.params
    mask = torch.full((1, 1, L, L), float("-inf"), device="cpu").triu(1).to(dev).type_as(model.output.weight)
    cos, sin = rotary_cos_sin(torch.arange(L, device=dev)[None], p.head_dim, p.rope_theta)
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        a = layer.attention
        x = layer.attention_norm(h)
        q = apply_rotary(a.wq(x).view(1, L, a.n_local_heads, a.head_dim), cos, sin)
        k = apply_rotary(a.wk(x).view(1, L, a.n_local_kv_heads, a.head_dim), cos, sin)
        v = a.wv(x).view(1, L, a.n_local_kv_heads, a.head_dim)
        rep = a.n_local_heads // a.n_local_kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / math.sqrt(a.head_dim) + mask
        scores = torch.softmax(scores.float(), dim=-1).type_as(q)
        h = h + a.wo((scores @ v.transpose(1, 2)).transpose(1, 2).reshape(1, L, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()

prompt = [1] + torch.randint(3, model.vocab_size, (length - 1,), generator=torch.Generator().manual_seed(0)).tolist()
base = reset_peak()
start = time.perf_counter()
if system == "ours":
    gen.generate([prompt], max_gen_len=1, temperature=0)
elif system == "reference":
    reference_prefill(torch.tensor([prompt], device=dev))
if dev.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({{"seconds": time.perf_counter() - start, "peak": peak(), "base": base}}))
"""


def reference_bytes(shape: dict, length: int, value_bytes: int) -> int:
    """What the reference's prefill materialises at once, at least: the host mask (float32), the
    device mask, one layer's scores (twice: before and after the mask is added) and the float32
    logits of every position."""
    heads = shape["n_heads"]
    square = length * length
    return square * (4 + value_bytes) + 2 * heads * square * value_bytes + length * shape["vocab_size"] * 4


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    return next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable")) * 1024


def run(system, ckpt, length, device, dtype):
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, system, str(ckpt), str(length), device, dtype],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    a = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from llama.tiny import write_tiny_model

    value_bytes = 4 if a.dtype == "float32" else 2
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_model(Path(tmp) / "model", **SHAPES[a.shape])
        print(f"shape {a.shape} {SHAPES[a.shape]}, {a.dtype}, {a.device}")
        print("| prompt tokens | this package: prefill (s) | peak memory (MiB) | reference algorithm: prefill (s) | peak memory (MiB) |")
        print("|---|---|---|---|---|")
        for length in a.lengths:
            ours = run("ours", ckpt, length, a.device, a.dtype)
            need = reference_bytes(SHAPES[a.shape], length, value_bytes)
            if need > 0.8 * available_bytes(a.device):
                ref = {"error": f"skipped: needs about {need / 2**30:.0f} GiB"}
            else:
                ref = run("reference", ckpt, length, a.device, a.dtype)

            def cells(r):
                if "error" in r:
                    return r["error"], "-"
                return f"{r['seconds']:.2f}", f"{(r['peak'] - r['base']) / 2**20:.0f}"

            print(f"| {length} | {' | '.join(cells(ours))} | {' | '.join(cells(ref))} |", flush=True)


if __name__ == "__main__":
    main()
