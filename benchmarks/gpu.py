"""Decode, prefill and ragged-batch speed of a model of a real shape with random weights made on the
device itself (no file, no transfer): eager and compile=True, bfloat16, int8 and int4, each with its
share of the memory-bandwidth roofline. The work of benchmarks/gpu.sh; it runs anywhere:

    python benchmarks/gpu.py --shape 7b --out /tmp/gpu.json      # a GPU (about 5 minutes on an H100)
    python benchmarks/gpu.py --shape tiny --device cpu             # the same code on a CPU, in seconds

Workloads (greedy, no stop token, so every variant does the same work), through llama.engine.Engine,
the seam Llama and the server use:
- decode b1 / b8: new tokens per second at batch 1 / 8 after a 16-token prompt, from two runs of
  --decode_len and 1 new tokens (their difference leaves the prefill out);
- prefill: one prompt of --prefill_len tokens, tokens per second;
- ragged: prompts of 3, 145, 185 and 372 tokens with 16 new tokens each, seconds.
Roofline: at batch 1 every weight the step uses is read once per token (the embedding table only
its row), so tokens/s x weight bytes is the bandwidth the step achieves; it is given as a fraction
of the card's published bandwidth and of a device-to-device copy measured here (bytes read plus
written). The KV cache read is left out (1% of the bytes at these lengths).

Items run in order of importance; one that would start after --budget seconds is skipped and says
so, and the JSON is rewritten after every item, so a run cut short keeps what it measured.
"""

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate import step_weight_bytes  # noqa: E402
from llama import distributed  # noqa: E402
from llama.engine import Engine  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.quantization import choose_scheme, input_widths, quantize_model  # noqa: E402
from llama.sampling import SamplingParams  # noqa: E402

SHAPES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32016, multiple_of=256),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32016, multiple_of=256),
    "34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                ffn_dim_multiplier=1.0),  # 34B does not fit one 80 GB card in bfloat16; int8/int4 do
    "tiny": dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64),
}
PUBLISHED_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10G": 600, "L4": 300}  # HBM/GDDR peak
RAGGED = [3, 145, 185, 372]


def published_bandwidth(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PUBLISHED_GBPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy of `nbytes`, counting bytes read and written (median of 10)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def sdpa_backends(device: torch.device) -> dict:
    """Which of PyTorch's attention kernels accept each call the model makes (7B and GQA head
    shapes, bfloat16): the review's check that prefill gets flash attention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    def qkv(b, h, h_kv, t, s):
        r = lambda *shape: torch.randn(*shape, dtype=torch.bfloat16, device=device)  # noqa: E731
        return r(b, h, t, 128), r(b, h_kv, s, 128), r(b, h_kv, s, 128)

    mask = torch.arange(1024, device=device) <= torch.arange(1016, 1024, device=device)[:, None]  # (8, 1024)
    cases = {
        "prefill, causal": (qkv(1, 32, 32, 2048, 2048), dict(is_causal=True)),
        "prefill chunk after cache": (qkv(1, 32, 32, 512, 2560), dict(attn_mask=causal_lower_right(512, 2560))),
        "decode, per-row mask": (qkv(8, 32, 32, 1, 1024), dict(attn_mask=mask[:, None, None])),
        "decode, per-row mask, GQA": (qkv(8, 64, 8, 1, 1024), dict(attn_mask=mask[:, None, None], enable_gqa=True)),
        "prefill, causal, GQA": (qkv(1, 64, 8, 2048, 2048), dict(is_causal=True, enable_gqa=True)),
    }
    out = {}
    for name, ((q, k, v), kw) in cases.items():
        out[name] = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, **kw)
                out[name].append(backend.name)
            except RuntimeError:
                pass
    return out


def random_model(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """A Transformer of `args` with random weights drawn on `device` (scaled so that activations
    stay in range), as Llama.build would hold a checkpoint's."""
    with torch.device("meta"):
        model = Transformer(args)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if key.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 1.0 if key.startswith("tok_embeddings") else p.shape[-1] ** -0.5, generator=g)
        state[key] = t
    model.load_state_dict(state, assign=True, strict=True)
    return model.requires_grad_(False)


class Bench:
    """Runs the items, keeps the rows, writes the JSON after each."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.start = time.time()
        self.rows, self.skipped, self.errors = [], [], []
        self.info = {
            "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "published_gbps": published_bandwidth(device),
        }
        self.g = torch.Generator().manual_seed(1)

    def left(self) -> float:
        return self.args.budget - (time.time() - self.start)

    def save(self) -> None:
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(
                {"info": self.info, "rows": self.rows, "skipped": self.skipped, "errors": self.errors}, indent=1))

    def prompts(self, vocab: int, lengths):
        return [torch.randint(3, vocab, (n,), generator=self.g).tolist() for n in lengths]

    def timed(self, engine: Engine, prompts, new: int) -> float:
        params = SamplingParams(temperature=0, max_gen_len=new)
        times = []
        for _ in range(self.args.repeat):
            sync(self.device)
            start = time.perf_counter()
            out = engine.complete(prompts, params, stop_ids=[])
            sync(self.device)
            times.append(time.perf_counter() - start)
            assert all(len(g.tokens) == new for g in out), "every row makes exactly `new` tokens"
        return statistics.median(times)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        self.save()
        rate = f"{row['tok_s']:.1f} tok/s" if "tok_s" in row else f"{row['seconds']:.3f} s"
        extra = f", {row['roofline']:.0%} of the published roofline" if row.get("roofline") else ""
        extra += f", {row['copy_roofline']:.0%} of copy bandwidth" if row.get("copy_roofline") else ""
        print(f"  {row['precision']:>5} {row['mode']:>8} {row['workload']:<9} {rate}{extra}", flush=True)

    def run(self, engine: Engine, label: dict, workload: str, nbytes: int) -> None:
        """Measure one workload on `engine` (warm-up first: a compiled step compiles then)."""
        vocab, a = engine.model.params.vocab_size, self.args
        row = dict(label, workload=workload)
        if workload.startswith("decode"):
            batch = int(workload[len("decode b"):])
            prompts = self.prompts(vocab, [16] * batch)
            start = time.time()
            self.timed_once(engine, prompts, a.decode_len)  # compiles a compiled step's shapes
            row["warmup_s"] = round(time.time() - start, 2)
            full, short = self.timed(engine, prompts, a.decode_len), self.timed(engine, prompts, 1)
            row.update(batch=batch, tok_s=batch * (a.decode_len - 1) / (full - short))
            if batch == 1:
                achieved = nbytes * row["tok_s"] / 1e9
                row["achieved_gbps"] = round(achieved, 1)
                if self.info["published_gbps"]:
                    row["roofline"] = achieved / self.info["published_gbps"]
                row["copy_roofline"] = achieved / self.info["copy_gbps"]
        elif workload == "prefill":
            prompts = self.prompts(vocab, [a.prefill_len])
            self.timed_once(engine, prompts, 1)
            row.update(batch=1, tok_s=a.prefill_len / self.timed(engine, prompts, 1))
        else:
            prompts = self.prompts(vocab, RAGGED)
            self.timed_once(engine, prompts, 16)
            row.update(batch=len(RAGGED), seconds=self.timed(engine, prompts, 16))
        self.record(row)

    def timed_once(self, engine: Engine, prompts, new: int) -> None:
        engine.complete(prompts, SamplingParams(temperature=0, max_gen_len=new), stop_ids=[])
        sync(self.device)


def plan(shape: str, device: torch.device):
    """(precision, mode, workloads) in order of importance."""
    compiled = ["decode b1"] if shape == "tiny" and device.type == "cpu" else ["decode b1", "decode b8"]
    return [
        ("bfloat16", "eager", ["decode b1", "decode b8", "prefill", "ragged"]),
        ("bfloat16", "compiled", compiled[:1]),
        ("int8", "compiled", ["decode b1"]),
        ("int4", "compiled", ["decode b1"]),
        ("int8", "eager", ["decode b1"]),
        ("int4", "eager", ["decode b1"]),
        ("bfloat16", "compiled", compiled[1:]),
        ("int8", "eager", ["decode b8", "prefill", "ragged"]),
        ("int4", "eager", ["decode b8", "prefill", "ragged"]),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--budget", type=float, default=300, help="seconds: items that would start later are skipped")
    parser.add_argument("--compile_reserve", type=float, default=None,
                        help="seconds a compiled item needs (default 100 on a GPU for 7B and larger, 30 otherwise)")
    parser.add_argument("--decode_len", type=int, default=None, help="new tokens per decode run (7b: 128, tiny: 16)")
    parser.add_argument("--prefill_len", type=int, default=None, help="prompt tokens for prefill (7b: 2048, tiny: 256)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per figure (the median)")
    parser.add_argument("--only", nargs="*", default=None, help="precisions to run (bfloat16 int8 int4)")
    a = parser.parse_args(argv)
    small = a.shape == "tiny"
    a.decode_len = a.decode_len or (16 if small else 128)
    a.prefill_len = a.prefill_len or (256 if small else 2048)
    device = distributed.resolve_device(a.device)
    if a.compile_reserve is None:
        a.compile_reserve = 30 if small or device.type != "cuda" else 100
    distributed.setup_model_parallel(1, device)
    bench = Bench(a, device)
    bench.info["copy_gbps"] = round(copy_bandwidth(device, 2**31 if device.type == "cuda" else 2**28), 1)
    print(f"{bench.info['device_name']}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"device-to-device copy {bench.info['copy_gbps']} GB/s, published {bench.info['published_gbps']} GB/s",
          flush=True)
    try:
        bench.info["sdpa_backends"] = sdpa_backends(device)
        print("attention kernels that accept each call:", json.dumps(bench.info["sdpa_backends"]), flush=True)
    except Exception as e:  # a probe: never the reason the benchmark stops
        bench.errors.append(f"sdpa probe: {type(e).__name__}: {e}"[:500])
    args = ModelArgs(**SHAPES[a.shape], max_batch_size=8, max_seq_len=max(a.prefill_len + 1, 1024))
    bench.info["model"] = {**SHAPES[a.shape], "ffn_hidden_dim": args.ffn_hidden_dim}
    bench.save()
    models = {}
    for precision, mode, workloads in plan(a.shape, device):
        if a.only and precision not in a.only:
            continue
        label = {"precision": precision, "mode": mode}
        reserve = a.compile_reserve if mode == "compiled" else 10
        if bench.left() < reserve:
            bench.skipped += [f"{precision} {mode} {w}: out of time" for w in workloads]
            bench.save()
            continue
        try:
            if precision not in models:  # all three stay: 25 GB for 7B
                model = random_model(args, torch.bfloat16, device)
                if precision != "bfloat16":
                    quantize_model(model, choose_scheme(precision, None, input_widths(args, 1)))
                models[precision] = {"model": model, "bytes": step_weight_bytes(model), "engines": {}}
            entry = models[precision]
            if mode not in entry["engines"]:
                entry["engines"][mode] = Engine(entry["model"], compile=mode == "compiled")
            label["weight_gb"] = round(entry["bytes"] / 1e9, 3)
            for w in workloads:
                if bench.left() < reserve:
                    bench.skipped.append(f"{precision} {mode} {w}: out of time")
                    continue
                bench.run(entry["engines"][mode], label, w, entry["bytes"])
                if mode == "compiled":
                    broken = entry["engines"][mode].decoder.broken
                    if broken:
                        bench.errors.append(f"{precision} compiled fell back to eager: {broken}")
        except Exception as e:  # one variant's failure must not cost the others
            bench.errors.append(f"{precision} {mode}: {type(e).__name__}: {e}"[:2000])
            traceback.print_exc()
        bench.save()
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "inductor", "graph_break")}
    bench.info["dynamo_counters"] = counters
    bench.save()
    print(json.dumps({"skipped": bench.skipped, "errors": bench.errors}, indent=1))


if __name__ == "__main__":
    main()
