"""Start-up time and peak host memory of Llama.build against the plain way of loading.

    python benchmarks/load.py [--dim 2048 --n_layers 16] [--repeat 3]
    python benchmarks/load.py --model smollm2 [--repeat 3]    # or --gguf PATH: one GGUF file, several ways

Writes a random checkpoint (1.6 GB with the defaults, bfloat16 like Meta's) once, then builds it in fresh
processes, alternating the methods:
- ours: Llama.build (model declared on the meta device, shards memory-mapped, tensors placed
  straight into the model's dtype);
- checked: the same with check_weights=True (every weight checked finite as it is loaded);
- plain: torch.load the shard into memory, build the model with allocated weights, load_state_dict.
Peak memory is the child's peak resident set (VmHWM, Linux) minus that of a child that only imports.

With --gguf (or --model smollm2, the file the tests use), one GGUF file is loaded in float32 by
- gguf: Llama.build on the .gguf (its vocabulary parsed from the metadata, the weights dequantized);
- meta: Llama.build on the same weights in Meta's layout, written once by
  `python -m llama.reshard GGUF meta --mp 1` (dequantized float32 .pth), tokenizer_path = the .gguf;
- meta+json: the same with the tokenizer.json that transformers writes for the file in the folder;
- vocabulary: llama.vocabulary.load_tokenizer on the .gguf alone (the tokenizer's share of gguf/meta);
- transformers: AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=float32);
- transformers+tok: the same and AutoTokenizer.from_pretrained(folder, gguf_file=name), as Llama.build
  also makes the tokenizer.
Imports happen before the clock starts, and each child's peak is taken above its own imports.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generate import smollm2_path  # noqa: E402  (this folder is on sys.path: the same file generate.py uses)
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


GGUF_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from llama import Llama
from llama.vocabulary import load_tokenizer
method, gguf, meta = sys.argv[1:4]
folder, name = gguf.rsplit("/", 1)
if method.startswith("transformers"):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401 (modeling_llama)
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401 (its GGUF reader)

def peak_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

imports = peak_mb()
start = time.perf_counter()
model = None
if method == "gguf":
    model = Llama.build(gguf, None, 256, 1, device="cpu", dtype="float32").model
elif method == "meta":
    model = Llama.build(meta, gguf, 256, 1, device="cpu", dtype="float32").model
elif method == "meta+json":
    model = Llama.build(meta, meta + "/tokenizer.json", 256, 1, device="cpu", dtype="float32").model
elif method == "vocabulary":
    load_tokenizer(gguf, None)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    if method == "transformers+tok":
        AutoTokenizer.from_pretrained(folder, gguf_file=name)
seconds = time.perf_counter() - start
built = peak_mb()
if model is not None:
    with torch.inference_mode():
        x = torch.tensor([[1, 2, 3]])  # touches every weight
        if method.startswith("transformers"):
            model(x)
        else:
            model.forward(x, 0)
print(json.dumps({{"seconds": seconds, "imports_mb": imports, "built_mb": built - imports,
                  "forward_mb": peak_mb() - imports}}))
"""
GGUF_METHODS = ("gguf", "meta", "meta+json", "vocabulary", "transformers", "transformers+tok")


def child(method: str, ckpt: Path, dtype: str) -> dict:
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, method, str(ckpt), dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gguf_child(method: str, gguf: Path, meta: Path) -> dict:
    """One fresh process loading `gguf` (or its Meta-layout copy `meta`) the way `method` names."""
    code = GGUF_CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, method, str(gguf), str(meta)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_meta_copy(gguf: Path, meta: Path) -> float:
    """The GGUF's weights in Meta's layout (python -m llama.reshard, float32 .pth), and transformers'
    tokenizer files for the GGUF beside them (tokenizer.json and tokenizer_config.json, for
    meta+json); returns reshard's seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llama.reshard", str(gguf), str(meta), "--mp", "1"], cwd=ROOT, check=True,
                   capture_output=True)
    seconds = time.perf_counter() - start
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(meta))
    return seconds


def compare_gguf(gguf: Path, repeat: int) -> None:
    """Load time and peak memory of one GGUF file, float32, by each of GGUF_METHODS: one table."""
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta"
        reshard_s = write_meta_copy(gguf, meta)
        pth_mb = sum(p.stat().st_size for p in meta.glob("*.pth")) / 2**20
        print(f"{gguf.name}: {gguf.stat().st_size / 2**20:.0f} MB; its Meta-layout copy (float32 .pth): {pth_mb:.0f} MB, "
              f"written by python -m llama.reshard in {reshard_s:.1f} s")
        runs = {m: [] for m in GGUF_METHODS}
        for _ in range(repeat):
            for method in GGUF_METHODS:
                runs[method].append(gguf_child(method, gguf, meta))
    print("| method | load time (s) | peak host memory above imports, after load (MB) | ... after a first forward (MB) "
          "| imports (MB) |")
    print("|---|---|---|---|---|")
    for method, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        fwd = f"{med['forward_mb']:.0f}" if method != "vocabulary" else "-"
        print(f"| {method} | {med['seconds']:.2f} | {med['built_mb']:.0f} | {fwd} | {med['imports_mb']:.0f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_layers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gguf", type=Path, help="compare loads of this GGUF file instead (float32)")
    parser.add_argument("--model", choices=["smollm2"], help="--gguf with SmolLM2-135M-Instruct (Q4_1), as the tests find it")
    a = parser.parse_args()
    if a.gguf or a.model:
        compare_gguf((a.gguf or smollm2_path()).resolve(), a.repeat)
        return
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
