"""Weight-only int8 / int4 quantization: the schemes' error bounds, the kernels behind `linear`
against the dequantized weights, checkpoints written by `python -m llama.quantize` against
quantizing as the weights load (one process and two), accuracy on a real model (SmolLM2), memory
mapped loading, composition with compile / batches / streams, and every bad input's error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from device import DEVICE, need_processes, subprocess_env
from llama import Llama
from llama import native
from llama.kernels import QuantizedWeight, int4_weight, linear, quantized_device_problem
from llama.memory import estimate, weight_bytes
from llama.model import ModelArgs
from llama.quantization import (
    GROUP_SIZES,
    Scheme,
    dequantize,
    kernel_weight,
    quantize,
    quantize_int8,
    quantize_model,
    quantized_bytes,
)
from llama.quantize import quantize_checkpoint
from llama.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [[1, 45, 300, 12, 77, 8, 150, 9, 260, 33], [1, 7, 7, 7, 99, 400, 2, 5, 6, 10]]
PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox jumps over the lazy dog. Write"]
U = torch.finfo(torch.bfloat16).eps / 2  # bfloat16's unit roundoff: rounding to it errs by at most U relative


def build(ckpt, **kw) -> Llama:
    kw = {"max_seq_len": 128, "max_batch_size": 4, "device": DEVICE, "dtype": "float32", **kw}
    return Llama.build(str(ckpt), str(Path(ckpt) / "tokenizer.model"), **kw)


def logits(generator: Llama) -> torch.Tensor:
    return generator.model.forward(torch.tensor(TOKENS), 0)


def awkward_weights(n=64, k=512) -> torch.Tensor:
    """Rows that stress a scheme: Gaussian, offset far from zero, one outlier, all zero, constant
    groups, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    w[1] += 5.0  # every group far from zero: the zero must carry it
    w[2, 7] = 80.0  # one outlier
    w[3] = 0.0
    w[4] = 0.375  # constant (and a bfloat16): every group is one value
    w[5] *= 1e-6
    w[6] *= 1e4
    w[7, :256] = torch.linspace(-1, 1, 256)
    return w


# The math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [Scheme("int8")] + [Scheme("int4", g) for g in GROUP_SIZES], ids=str)
def test_round_trip_is_within_half_a_step(scheme):
    """Each weight is within half its row's (int8) or group's (int4) step of its dequantized value.
    float32 arithmetic (the division, and (q - 8) * scale + zero) adds a few units in the last
    place of the numbers involved: 2**-20 of the step and of the weight covers them."""
    w = awkward_weights()
    t = quantize(w, scheme)
    assert t.values.dtype == (torch.int8 if scheme.mode == "int8" else torch.uint8)
    assert t.scale.dtype == torch.bfloat16 and (t.zero is None or t.zero.dtype == torch.bfloat16)
    step = t.scale.float()[:, None] if scheme.mode == "int8" else t.scale.float().repeat_interleave(scheme.group_size, 1)
    err = (dequantize(t) - w).abs()
    slack = 2**-20 * (step + w.abs())
    assert (err <= step / 2 + slack).all(), (err - step / 2).max()
    assert int(t.values.min()) >= (-127 if scheme.mode == "int8" else 0)
    assert int(t.values.max()) <= (127 if scheme.mode == "int8" else 15)
    assert torch.equal(dequantize(t)[3], torch.zeros(w.shape[1])), "a zero row stays zero"
    if scheme.mode == "int4":
        assert torch.equal(dequantize(t)[4], w[4]), "a constant group of a bfloat16 value is its zero, exactly"


def test_int8_scale_of_a_row_split_over_ranks():
    """A slice of a row quantizes with the whole row's largest magnitude: the same values as the
    whole weight's, column for column."""
    w = awkward_weights()
    whole = quantize_int8(w)
    half = quantize_int8(w[:, 256:], absmax=w.abs().amax(1))
    assert torch.equal(half.scale, whole.scale) and torch.equal(half.values, whole.values[:, 256:])


@pytest.mark.parametrize("rows", [1, 3, 130])
@pytest.mark.parametrize("scheme", [Scheme("int8")] + [Scheme("int4", g) for g in GROUP_SIZES], ids=str)
def test_linear_equals_the_dequantized_product(scheme, rows):
    """`linear` on a QuantizedWeight is x @ dequantize(W)^T up to what the kernels round: x to
    bfloat16 (each term off by at most U |x_k| |W_ik|) and the result to bfloat16 (U |y_i|, and
    |y_i| <= sum_k |x_k| |W_ik|); their float32 accumulation adds at most K 2**-24 of that sum. So
    |error_i| <= (2 U + K 2**-24) sum_k |x_k| |W_ik|, with U = eps(bfloat16) / 2."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 512, generator=g) * 0.05
    x = torch.randn(2, rows, 512, generator=g)
    t = quantize(w, scheme)
    weight = kernel_weight(t, torch.device(DEVICE))
    assert isinstance(weight, QuantizedWeight) and weight.shape == (96, 512)
    got = linear(x, weight)
    deq = dequantize(t).double()
    exact = x.double() @ deq.T
    bound = (2 * U + 512 * 2**-24) * (x.double().abs() @ deq.abs().T)
    assert got.dtype == x.dtype and got.shape == (2, rows, 96)
    assert ((got.double() - exact).abs() <= bound).all()


def test_quantized_sizes_in_the_memory_estimate():
    """7B's projections: int8 one byte a weight, int4 half a byte, plus their bfloat16 scales;
    the embedding and output layer stay in the build's dtype."""
    seven_b = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, multiple_of=256, ffn_dim_multiplier=1.0)
    projections = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 2 * 32016 * 4096 + 65 * 4096
    assert weight_bytes(seven_b, 1, 2, Scheme("int8")) == projections + rest * 2 + 32 * 2 * (4 * 4096 + 2 * 11008 + 4096)
    int4 = weight_bytes(seven_b, 1, 2, Scheme("int4", 128))
    assert int4 == projections // 2 + rest * 2 + 4 * projections // 128
    assert int4 / 2**30 == pytest.approx(3.7, abs=0.05)  # against 12.6 GiB in bfloat16
    assert weight_bytes(seven_b, 1, 2) / 2**30 == pytest.approx(12.55, abs=0.01)
    assert quantized_bytes(16, 256, Scheme("int4", 32)) == 16 * 128 + 16 * 8 * 4


def test_memory_cli_knows_quantized_sizes(tiny_dir, int4_dir):
    full = estimate(str(tiny_dir), 64, 1, 1, "float32")["weights"]
    int8 = estimate(str(tiny_dir), 64, 1, 1, "float32", quantize="int8")["weights"]
    assert estimate(str(int4_dir), 64, 1, 1, "float32")["weights"] < int8 < full
    run = subprocess.run([sys.executable, "-m", "llama.memory", "--ckpt_dir", tiny_dir, "--max_seq_len", "100",
                          "--quantize", "int4", "--group_size", "32"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "weights" in run.stdout, run.stderr


# Checkpoints written by python -m llama.quantize ------------------------------------------------------


@pytest.fixture(scope="module")
def int8_dir(tiny_dir, tmp_path_factory) -> Path:
    return quantize_checkpoint(str(tiny_dir), str(tmp_path_factory.mktemp("q") / "int8"), "int8", show_progress=False)


@pytest.fixture(scope="module")
def int4_dir(tiny_dir, tmp_path_factory) -> Path:
    """int4 in groups of 32, which fit the tiny model's widths on 1 and 2 processes."""
    return quantize_checkpoint(str(tiny_dir), str(tmp_path_factory.mktemp("q") / "int4"), "int4", 32,
                               show_progress=False)


@pytest.fixture(scope="module")
def int4_64_dir(tiny_dir, tmp_path_factory) -> Path:
    """int4 by the default group size on one process: 64 (the tiny model's widths are 64 and 192)."""
    return quantize_checkpoint(str(tiny_dir), str(tmp_path_factory.mktemp("q") / "int4_64"), "int4",
                               show_progress=False)


def test_checkpoint_layout(int8_dir, int4_64_dir):
    """Meta's layout: values one a byte, bfloat16 scales (and zeros) under clear names, the scheme
    in params.json, the tokenizer copied, a checklist."""
    state = torch.load(int4_64_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    assert state["layers.0.attention.wq.weight"].dtype == torch.uint8
    assert state["layers.0.feed_forward.w2.weight"].shape == (64, 192)
    assert state["layers.0.feed_forward.w2.scale"].shape == (64, 3) == state["layers.0.feed_forward.w2.zero"].shape
    assert state["output.weight"].dtype == state["tok_embeddings.weight"].dtype == torch.bfloat16
    assert json.loads((int4_64_dir / "params.json").read_text())["quantization"] == {"mode": "int4", "group_size": 64}
    state = torch.load(int8_dir / "consolidated.00.pth", mmap=True, weights_only=True)
    assert state["layers.1.attention.wo.weight"].dtype == torch.int8 and state["layers.1.attention.wo.scale"].shape == (64,)
    assert json.loads((int8_dir / "params.json").read_text())["quantization"] == {"mode": "int8"}
    assert (int8_dir / "tokenizer.model").is_file() and (int8_dir / "checklist.chk").is_file()


def test_cli(tiny_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "llama.quantize", "--ckpt_dir", tiny_dir, "--out", tmp_path / "q",
                          "--mode", "int4", "--group_size", "32"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "group_size 32" in run.stdout and (tmp_path / "q" / "consolidated.00.pth").is_file()


def test_gguf_source_carries_its_vocabulary(tiny_dir, tmp_path):
    """A GGUF file holds its vocabulary: the quantized copy writes it out, so the copy builds with no
    tokenizer_path, tokenizes as the GGUF does, and serves as that GGUF's draft model (greedy
    answers equal to plain decoding's)."""
    from llama.gguf_export import write_gguf

    source = write_gguf(str(tiny_dir), str(tmp_path / "tiny.gguf"), show_progress=False)
    out = quantize_checkpoint(str(source), str(tmp_path / "q"), "int8", show_progress=False)
    assert (out / "tokenizer.model").is_file()
    def build_alone(ckpt, **kw):  # the tokenizer is the one the checkpoint carries
        return Llama.build(str(ckpt), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32", **kw)

    plain, copy = build_alone(source), build_alone(out)
    assert copy.tokenizer.encode(PROMPTS[2], bos=True, eos=False) == plain.tokenizer.encode(PROMPTS[2], bos=True, eos=False)
    drafted = build_alone(source, speculative=str(out))
    prompts = [plain.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert (drafted.generate(prompts, 12, temperature=0, stop_token=-1)[0]
            == plain.generate(prompts, 12, temperature=0, stop_token=-1)[0])


@pytest.mark.parametrize("ckpt, mode, group", [("int8_dir", "int8", None), ("int4_dir", "int4", 32),
                                                 ("int4_64_dir", "int4", None)])
def test_checkpoint_gives_the_logits_of_quantizing_on_load(request, tiny_dir, ckpt, mode, group):
    """One process: exactly the same logits as quantize= on the full-precision checkpoint."""
    from_file = build(request.getfixturevalue(ckpt))
    on_load = build(tiny_dir, quantize=mode, group_size=group)
    assert type(from_file.model.layers[0].feed_forward.w2.weight) is QuantizedWeight
    assert torch.equal(logits(from_file), logits(on_load))


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 32)])
def test_checkpoint_of_two_shards(tiny_mp2_dir, tiny_dir, tmp_path, mode, group):
    """A source of 2 shards (the same weights as tiny_dir) gives 2 quantized shards, which load on
    one process to exactly the logits of quantizing the one-shard source on load: int8 rows split
    over the shards (wo, w2) take their scale from the whole row."""
    out = quantize_checkpoint(str(tiny_mp2_dir), str(tmp_path / "q"), mode, group, show_progress=False)
    assert sorted(p.name for p in out.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert torch.equal(logits(build(out)), logits(build(tiny_dir, quantize=mode, group_size=group)))


def test_quantize_model_equals_quantize_on_load(tiny_dir):
    """A model built in full precision, then quantized, is the model quantize= builds."""
    model = quantize_model(build(tiny_dir).model, Scheme("int4", 64))
    model.cache = None
    assert torch.equal(model.forward(torch.tensor(TOKENS), 0), logits(build(tiny_dir, quantize="int4")))


@pytest.fixture(scope="module")
def mp2_results(tiny_dir, int8_dir, int4_dir, int4_64_dir, tmp_path_factory):
    """Every rank's results of one torchrun run (2 processes, gloo) over the quantized builds."""
    out = tmp_path_factory.mktemp("mp2q")
    specs = {"int8_file": int8_dir, "int8_load": f"{tiny_dir}:int8", "int4_file": int4_dir,
             "int4_load": f"{tiny_dir}:int4", "int4_64_file": int4_64_dir, "int4_64_load": f"{tiny_dir}:int4:64"}
    need_processes(2)
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "mp_quantized.py"), str(out), *(f"{k}={v}" for k, v in specs.items())]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_mp2_checkpoint_gives_the_logits_of_quantizing_on_load(mp2_results, mode):
    """Two processes, a one-shard checkpoint split on load: int8 rows of wo and w2 keep their
    whole-row scale, int4 groups (of 32: on-the-fly's default at this degree) stay within a
    slice. Exactly the logits of quantize= at the same degree, the same answers on both ranks."""
    rank0, rank1 = mp2_results
    torch.testing.assert_close(rank0[f"{mode}_file"]["logits"], rank0[f"{mode}_load"]["logits"], rtol=0, atol=0)
    assert rank0[f"{mode}_file"]["completion"] == rank0[f"{mode}_load"]["completion"] == rank1[f"{mode}_file"]["completion"]


@pytest.mark.parametrize("ckpt, mode", [("int8_dir", "int8"), ("int4_dir", "int4")])
def test_mp2_tracks_one_process(request, mp2_results, ckpt, mode):
    """The same quantized weights on 2 processes as on 1, the same greedy answers; streams join to
    them. The logits differ by rounding only: the kernels return bfloat16, so each rank's partial
    product of wo and w2 is rounded (by up to U of itself) before the all-reduce adds them, where
    one process rounds the sum; a few such roundings, carried through two layers to the logits,
    stay within 4 bfloat16 epsilons of the logits' size (measured: about 1)."""
    one = build(request.getfixturevalue(ckpt))
    two = mp2_results[0][f"{mode}_file"]
    expected = logits(one)
    atol = 4 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
    torch.testing.assert_close(two["logits"], expected, rtol=0, atol=atol)
    for prompt, answer in zip(PROMPTS, two["completion"]):
        assert_same_greedy_answer(one, prompt, answer, atol)
    assert "".join(two["stream"]) == two["completion"][0]


def assert_same_greedy_answer(generator: Llama, prompt: str, answer: str, atol: float) -> None:
    """`answer` (from another process count) is the generator's greedy answer to `prompt`, but for
    a tie: they may part at a step whose two best logits are within `atol` (the rounding the logits
    are allowed to differ by), where greedy decoding is a coin toss between the two."""
    prompt_tokens = generator.tokenizer.encode(prompt, bos=True, eos=False)
    tokens = generator.generate([prompt_tokens], max_gen_len=12, temperature=0)[0][0]
    ours = generator.tokenizer.decode(tokens)
    if answer == ours:
        return
    part = next(i for i in range(len(tokens) + 1) if not answer.startswith(generator.tokenizer.decode(tokens[:i + 1])))
    generator.model.cache = None
    with torch.inference_mode():
        step = generator.model.forward(torch.tensor([prompt_tokens + tokens[:part]]), 0)[0, -1]
    best, second = step.topk(2).values.tolist()
    assert best - second <= atol, (answer, ours, part, best - second)


def test_mp2_groups_that_would_cross_a_slice(mp2_results):
    """A checkpoint quantized in groups of 64 cannot split wo's 64 input columns over 2 processes
    (32 each), nor can quantize= with group_size=64: clear errors naming the sizes that fit."""
    for name in ("int4_64_file", "int4_64_load"):
        error = mp2_results[0][name]["error"]
        assert "64 does not divide the input width of wo (32)" in error and "w2 (96)" in error
        assert "group sizes that fit: 32" in error


# A real model: SmolLM2-135M-Instruct ----------------------------------------------------------------

TEXT = '''Code Llama is a family of large language models for code. It can complete code, fill in the
middle of a function from the code around it, and follow instructions written in plain English.

def merge_sorted(a: list, b: list) -> list:
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]

The function walks both lists once, so it takes time proportional to their total length.'''
QUESTIONS = ["def fibonacci(n):", "The capital of France is"]
ANSWER_TOKENS = 8


def smollm2_build(path, **kw) -> Llama:
    return Llama.build(str(path), max_seq_len=512, max_batch_size=1, device=DEVICE, dtype="float32", **kw)


def smollm2_run(generator: Llama):
    """(next-token logits at every position of TEXT, greedy answers' tokens to QUESTIONS)."""
    tokens = generator.tokenizer.encode(TEXT, bos=False, eos=False)
    with torch.inference_mode():
        out = generator.model.forward(torch.tensor([tokens]), 0)[0]
    prompts = [generator.tokenizer.encode(q, bos=False, eos=False) for q in QUESTIONS]
    return out, [generator.generate([p], ANSWER_TOKENS, temperature=0, stop_token=-1)[0][0] for p in prompts]


@pytest.fixture(scope="module")
def smollm2_full(smollm2_gguf):
    """Full precision (float32): logits, answers, and the top-1 agreement of a bfloat16 copy."""
    generator = smollm2_build(smollm2_gguf)
    full, answers = smollm2_run(generator)
    with torch.inference_mode():
        model = generator.model.to(torch.bfloat16)
        model.cache = None
        tokens = generator.tokenizer.encode(TEXT, bos=False, eos=False)
        bf16 = model.forward(torch.tensor([tokens]), 0)[0]
    return full, answers, (bf16.argmax(-1) == full.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 32)])
def test_smollm2_tracks_full_precision(smollm2_gguf, smollm2_full, mode, group):
    """Top-1 agreement of the next-token predictions over a fixed text of code and prose, and the
    first ANSWER_TOKENS greedy tokens of two answers (measured to agree for 12 or more).

    The bar: no more than twice the disagreements of the same model in bfloat16 (the precision
    CUDA builds run in by default; ~97% agreement here): int8's rounding (half a step of a row's
    largest magnitude / 127) is about as coarse. int4 is tested in groups of 32: this GGUF holds
    Q4_1 weights, 4-bit grids of 32 columns with a scale and a minimum, which int4 in groups of
    32 holds up to the bfloat16 rounding of its scale and zero, so it owes the same bar. (Groups
    of 64 mix two such grids: measured 68% agreement; see README.)"""
    full, answers, bf16_agreement = smollm2_full
    got, got_answers = smollm2_run(smollm2_build(smollm2_gguf, quantize=mode, group_size=group))
    agreement = (got.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert agreement >= 1 - 2 * (1 - bf16_agreement), (agreement, bf16_agreement)
    assert got_answers == answers


# Memory: loading maps the file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A model whose projections dominate its size: 27.3M projection weights (109 MB in float32),
    a 512-token vocabulary."""
    return write_tiny_model(tmp_path_factory.mktemp("wide"), dim=512, n_layers=8, n_heads=8, n_kv_heads=8,
                            multiple_of=256)


def resident_growth(tiny_dir, ckpt) -> dict:
    """Bytes by which a fresh process's resident set grows over Llama.build(ckpt) and a short
    generation, after a warm-up build of the tiny model has paid the kernels' one-time costs:
    as it is ("rss"), and once glibc has returned the free memory it keeps ("trimmed": what the
    process holds)."""
    script = f"""
import ctypes, sys, json
sys.path.insert(0, {str(ROOT)!r})
from llama import Llama
def rss(trim=False):
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
def run(ckpt, **kw):
    g = Llama.build(ckpt, ckpt + "/tokenizer.model", 64, 1, device="cpu", dtype="float32", **kw)
    g.generate([[1, 5, 9, 30]], 4, temperature=0)
    return g
for mode in ("int8", "int4"):
    run({str(tiny_dir)!r}, quantize=mode)
before = rss(trim=True)
kept = run({str(ckpt)!r})
grown = rss()
print(json.dumps({{"rss": grown - before, "trimmed": rss(trim=True) - before}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_loading_maps_the_file(tiny_dir, wide_dir, tmp_path, mode):
    """A quantized checkpoint's build grows the process by about its quantized size (int8 values
    mapped in place; int4 packed once, the mapping released), not by the full-precision size: we
    allow the quantized bytes plus 15% of the float32 size for activations, caches and allocator
    slack, well below the 4x (int8) or 8x (int4) that a full-precision copy would take. Packing
    int4 goes through a transient int32 copy of each matrix (the kernel's input); glibc may keep
    that freed memory for mid-size matrices (measured: up to 60 MB here, at random), so the bound
    is on what the process holds once trimmed; the resident set as it is stays below one
    full-precision copy."""
    quantized = quantize_checkpoint(str(wide_dir), str(tmp_path / mode), mode, show_progress=False)
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=520, multiple_of=256)
    full = weight_bytes(args, 1, 4)
    small = weight_bytes(args, 1, 4, Scheme("int8") if mode == "int8" else Scheme("int4", 128))
    growth = resident_growth(tiny_dir, quantized)
    mib = {k: round(v / 2**20, 1) for k, v in {**growth, "quantized": small, "full": full}.items()}
    assert growth["trimmed"] < small + 0.15 * full, mib
    assert growth["rss"] < full, mib


# Composition ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batched_ragged_and_streamed(int8_dir, int4_dir, mode):
    """A ragged batch gives each prompt its answer alone; a stream joins to the same text."""
    generator = build(int8_dir if mode == "int8" else int4_dir)
    together = generator.text_completion(PROMPTS + ["x"], temperature=0, max_gen_len=10)
    alone = [generator.text_completion([p], temperature=0, max_gen_len=10)[0] for p in PROMPTS + ["x"]]
    assert together == alone
    assert "".join(generator.text_completion_stream(PROMPTS[0], temperature=0, max_gen_len=10)) == alone[0]["generation"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_decode(int8_dir, int4_dir, mode):
    """compile=True compiles the quantized kernels into the decode step and changes no answer."""
    ckpt = int8_dir if mode == "int8" else int4_dir
    compiled = build(ckpt, compile=True)
    got = compiled.text_completion(PROMPTS, temperature=0, max_gen_len=8)
    assert compiled.engine.decoder.broken is None
    assert got == build(ckpt).text_completion(PROMPTS, temperature=0, max_gen_len=8)


# Errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, words", [
    ({"quantize": "int3"}, ["unknown quantize='int3'", "'int8', 'int4'"]),
    ({"quantize": "int4", "group_size": 48}, ["group_size=48", "32, 64, 128, 256"]),
    ({"quantize": "int8", "group_size": 64}, ["applies to quantize='int4' only"]),
    ({"quantize": "int4", "group_size": 128}, ["128 does not divide", "wq (64)", "w2 (192)", "sizes that fit: 32, 64"]),
])
def test_bad_requests(tiny_dir, kw, words):
    with pytest.raises(ValueError) as info:
        build(tiny_dir, **kw)
    for w in words:
        assert w in str(info.value)


def test_quantizing_a_quantized_checkpoint(int8_dir, tmp_path):
    with pytest.raises(ValueError, match=r"already quantized \(int8\).*full-precision"):
        quantize_checkpoint(str(int8_dir), str(tmp_path / "again"), "int4")
    with pytest.raises(ValueError, match=r"already quantized \(int8\); build with quantize=None"):
        build(int8_dir, quantize="int4")
    run = subprocess.run([sys.executable, "-m", "llama.quantize", "--ckpt_dir", int8_dir, "--out", tmp_path / "x",
                          "--mode", "int8"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "already quantized" in run.stderr
    assert build(int8_dir, quantize="int8") is not None  # the checkpoint's own scheme, named


@pytest.fixture
def int4_copy(int4_dir, tmp_path) -> Path:
    return Path(shutil.copytree(int4_dir, tmp_path / "int4"))


def edit(ckpt: Path, **changes) -> None:
    """Rewrite consolidated.00.pth with some tensors replaced (None: removed)."""
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, ckpt / "consolidated.00.pth")


def test_missing_scale_tensor(int4_copy):
    edit(int4_copy, **{"layers.1.feed_forward.w3.zero": None})
    with pytest.raises(ValueError, match=r"lack\(s\) layers\.1\.feed_forward\.w3\.zero: .*int4.*scale and zero"):
        build(int4_copy)


def test_values_in_the_wrong_dtype(int4_copy):
    state = torch.load(int4_copy / "consolidated.00.pth", weights_only=True)
    edit(int4_copy, **{"layers.0.attention.wq.weight": state["layers.0.attention.wq.weight"].float()})
    with pytest.raises(ValueError, match=r"wq\.weight .* is torch\.float32, but params\.json declares .* torch\.uint8"):
        build(int4_copy)


def test_integer_tensor_that_is_no_quantized_weight(int4_copy):
    edit(int4_copy, **{"norm.weight": torch.ones(64, dtype=torch.int8)})
    with pytest.raises(ValueError, match="norm.weight .* not floating point: only the projections"):
        build(int4_copy)


def test_bad_declaration(int4_copy):
    params = json.loads((int4_copy / "params.json").read_text())
    (int4_copy / "params.json").write_text(json.dumps({**params, "quantization": {"mode": "int4", "group_size": 48}}))
    with pytest.raises(ValueError, match="'quantization' must be"):
        build(int4_copy)


@pytest.mark.parametrize("int8", [["norm.weight"], "layers.0.attention.wq.weight", [3]])
def test_bad_list_of_projections_held_in_int8(int4_copy, int8):
    params = json.loads((int4_copy / "params.json").read_text())
    scheme = {"mode": "int4", "group_size": 32, "int8": int8}
    (int4_copy / "params.json").write_text(json.dumps({**params, "quantization": scheme}))
    with pytest.raises(ValueError, match="'quantization' must be.*a list of projections held in int8"):
        build(int4_copy)


def test_a_projection_listed_in_int8_must_be_stored_so(int4_copy):
    """params.json says wq is held in int8, the file holds its int4 values: named, not misread."""
    params = json.loads((int4_copy / "params.json").read_text())
    scheme = {"mode": "int4", "group_size": 32, "int8": ["layers.0.attention.wq.weight"]}
    (int4_copy / "params.json").write_text(json.dumps({**params, "quantization": scheme}))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.zero, which params.json declares no place for "
                                         r"\(int4 in groups of 32, 1 projection in int8: held in int8"):
        build(int4_copy)


def test_conversions_refuse_quantized_checkpoints(int8_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "llama.convert", "to-hf", int8_dir, tmp_path / "hf"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "python -m llama.convert: error: " in run.stderr and "already quantized (int8)" in run.stderr


def test_devices_without_kernels(monkeypatch):
    assert quantized_device_problem("int4", torch.device("cpu")) is None
    assert "device='cpu'" in quantized_device_problem("int4", torch.device("mps"))
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    message = quantized_device_problem("int4", torch.device("cuda", 0))
    assert "Tesla T4 is sm75" in message and "quantize='int8'" in message and "A100" in message
    assert quantized_device_problem("int8", torch.device("cuda", 0)) is None


def test_int4_needs_rows_in_sixteens(monkeypatch):
    """PyTorch's int4 layout takes output rows in sixteens (the project's CPU kernels take any)."""
    values = torch.zeros(24, 64, dtype=torch.uint8)
    scales = torch.ones(24, 2)
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(ValueError, match="multiple of 16 output rows .* has 24: use quantize='int8'"):
        int4_weight(values, scales, scales, 32, torch.device("cpu"))
