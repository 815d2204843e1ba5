"""Start-up time and peak host memory of Llama.build against the plain way of loading.

    python benchmarks/load.py [--dim 2048 --n_layers 16] [--repeat 3]

Writes a random checkpoint (1.6 GB with the defaults, bfloat16 like Meta's) once, then builds it in fresh
processes, alternating the methods:
- ours: Llama.build (model declared on the meta device, shards memory-mapped, tensors placed
  straight into the model's dtype);
- checked: the same with check_weights=True (every weight checked finite as it is loaded);
- plain: torch.load the shard into memory, build the model with allocated weights, load_state_dict.
Peak memory is the child's peak resident set (VmHWM, Linux) minus that of a child that only imports.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.tiny import write_tiny_model  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from llama import Llama
method, ckpt, dtype = sys.argv[1:4]
start = time.perf_counter()
if method in ("ours", "checked"):
    g = Llama.build(ckpt, ckpt + "/tokenizer.model", 256, 1, device="cpu", dtype=dtype, check_weights=method == "checked")
elif method == "plain":
    from llama import distributed
    from llama.checkpoint import read_params
    from llama.loading import model_args
    from llama.model import Transformer
    from llama.tokenizer import Tokenizer
    from pathlib import Path
    distributed.setup_model_parallel(None, torch.device("cpu"))
    tok = Tokenizer(ckpt + "/tokenizer.model")
    state = torch.load(ckpt + "/consolidated.00.pth", map_location="cpu")
    args = model_args(read_params(Path(ckpt)), tok.n_words, 256, 1, "params.json")
    model = Transformer(args).to(getattr(torch, dtype))
    model.load_state_dict(state, strict=False)
    del state
seconds = time.perf_counter() - start

def peak_mb():
    # VmHWM: this address space's peak resident set (ru_maxrss would include the parent's before exec).
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

built = peak_mb()
if method != "none":
    (model if method == "plain" else g.model).forward(torch.tensor([[1, 2, 3]]), 0)  # touches every weight
print(json.dumps({{"seconds": seconds, "built_mb": built, "forward_mb": peak_mb()}}))
"""


def child(method: str, ckpt: Path, dtype: str) -> dict:
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, method, str(ckpt), dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_layers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_model(Path(tmp) / "ckpt", dim=a.dim, n_layers=a.n_layers, n_heads=a.dim // 64, n_kv_heads=a.dim // 64)
        size_mb = (ckpt / "consolidated.00.pth").stat().st_size / 2**20
        base = child("none", ckpt, "float32")["built_mb"]
        print(f"checkpoint: dim {a.dim}, {a.n_layers} layers, {size_mb:.0f} MB (bfloat16); "
              f"a process that only imports uses {base:.0f} MB")
        print("| dtype | method | build time (s) | peak host memory above imports, after build (MB) | ... after a first forward (MB) |")
        print("|---|---|---|---|---|")
        for dtype in ("bfloat16", "float32"):
            runs = {"ours": [], "checked": [], "plain": []}
            for _ in range(a.repeat):
                for method in runs:
                    runs[method].append(child(method, ckpt, dtype))
            for method, rs in runs.items():
                t = statistics.median(r["seconds"] for r in rs)
                built = statistics.median(r["built_mb"] for r in rs) - base
                fwd = statistics.median(r["forward_mb"] for r in rs) - base
                print(f"| {dtype} | {method} | {t:.2f} | {built:.0f} | {fwd:.0f} |")


if __name__ == "__main__":
    main()
