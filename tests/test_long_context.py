"""Long prompts: chunked prefill, a KV cache that follows the work, memory linear in the prompt."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from device import DEVICE
from llama import Llama
from llama.batch import prefill as batch_prefill
from llama.distributed import check_cuda_room
from llama.memory import kv_cache_bytes, weight_bytes
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def prefill(gen: Llama, prompts, chunk):
    """Last-token logits, prompt log-probabilities and the cached keys/values of each prompt's real
    positions after llama.batch.prefill with this chunk size."""
    model = gen.model
    model.reserve_cache(len(prompts), max(map(len, prompts)))
    _, logits, lps = batch_prefill(model, prompts, [True] * len(prompts), True, chunk)
    kv = [[t[i, :, : len(p)].clone() for t in model.cache.k + model.cache.v] for i, p in enumerate(prompts)]
    return logits, lps, kv


@pytest.mark.parametrize("fixture", ["generator", "step_generator"], ids=["gqa", "mha"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(request, fixture, chunk):
    gen = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(0)
    prompts = sorted(([1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (36, 49, 80)), key=len)
    logits, lps, kv = prefill(gen, prompts, chunk)
    logits1, lps1, kv1 = prefill(gen, prompts, 10**6)
    torch.testing.assert_close(logits, logits1, atol=1e-5, rtol=0)
    for a, b in zip(lps, lps1):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    for row, row1 in zip(kv, kv1):
        for t, t1 in zip(row, row1):
            torch.testing.assert_close(t, t1, atol=1e-5, rtol=0)


def test_chunked_generation_equals_one_shot(generator):
    prompts = ["def fibonacci(n: int) -> int:\n    if n < 2:\n        return n", "import os"]
    expected = generator.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True, echo=True)
    try:
        generator.engine.prefill_chunk_size = 3
        got = generator.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True, echo=True)
    finally:
        generator.engine.prefill_chunk_size = 2048
    for a, b in zip(got, expected):
        assert a["generation"] == b["generation"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4


def test_nothing_of_max_seq_len_is_reserved(tiny_dir):
    """max_seq_len=100_000 with max_batch_size=4 (195 GiB of KV cache for a 7B in the reference)
    reserves nothing at build; a call reserves what it needs, rounded up."""
    gen = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 100_000, 4, device=DEVICE, dtype="float32")
    assert gen.model.cache is None
    gen.text_completion(["import os", "x"], temperature=0, max_gen_len=20)
    cache = gen.model.cache
    assert (cache.batch_size, cache.seq_len) == (2, 256)
    cache_bytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert cache_bytes == 2 * 2 * 2 * 2 * 256 * 16 * 4  # layers x (k, v) x rows x kv heads x positions x head dim x 4
    assert cache_bytes * 500 < kv_cache_bytes(gen.model.params, 4, 100_000, 1, 4)


def test_cache_grows_for_a_longer_call_and_is_reused(generator):
    generator.text_completion(["x"], temperature=0, max_gen_len=4)
    small = generator.model.cache
    generator.generate([[1] * 120, [1, 2]], temperature=0, max_gen_len=4)
    assert generator.model.cache is small  # the same cache object, grown
    assert small.seq_len >= 124 and small.batch_size >= 2


def test_long_prompt_warning(tiny_dir):
    """A prompt longer than the trained context warns (4k tokens with rope_theta 1e4), never refuses."""
    gen = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 4200, 1, device=DEVICE, dtype="float32")
    gen.model.params.rope_theta = 10000.0
    with pytest.warns(UserWarning, match="4100 tokens is longer than the 4096"):
        gen.generate([[1] * 4100], max_gen_len=2, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen.generate([[1] * 4000], max_gen_len=2, temperature=0)


def test_16k_prompt_memory_is_linear(tiny_dir):
    """A 16k-token prompt stays far below what square (16k x 16k) score matrices need: 4 GiB per
    layer for this model's 4 heads in float32. Measured as the peak resident set of a subprocess."""
    script = f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
from llama import Llama
gen = Llama.build({str(tiny_dir)!r}, {str(tiny_dir / "tokenizer.model")!r}, 16500, 1, device="cpu", dtype="float32")
tokens, _ = gen.generate([[1] + [300] * 16383], max_gen_len=2, temperature=0)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
print(json.dumps({{"peak": peak, "tokens": tokens[0]}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    square_scores = 16384 * 16384 * 4 * 4
    assert len(result["tokens"]) == 2
    assert result["peak"] < square_scores / 4, f"peak {result['peak'] / 2**20:.0f} MiB"


def test_memory_estimates_match_known_shapes():
    seven_b = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, multiple_of=256, ffn_dim_multiplier=1.0)
    assert weight_bytes(seven_b, 1, 2) == 6_738_546_688 * 2
    assert kv_cache_bytes(seven_b, 4, 100_000, 1, 2) / 2**30 == pytest.approx(195.3, abs=0.1)  # the reference's up-front cache
    assert kv_cache_bytes(seven_b, 1, 16_384, 1, 2) / 2**30 == pytest.approx(8.0)
    thirty_four_b = ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000)
    assert kv_cache_bytes(thirty_four_b, 1, 100_000, 4, 2) / 2**30 == pytest.approx(4.58, abs=0.01)


def test_memory_cli(tiny_dir):
    run = subprocess.run([sys.executable, "-m", "llama.memory", "--ckpt_dir", tiny_dir, "--max_seq_len", "100000",
                          "--max_batch_size", "4", "--mp", "2"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "KV cache" in run.stdout and "weights" in run.stdout and "total" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "llama.memory", "--ckpt_dir", "/nonexistent", "--max_seq_len", "10"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "params.json" in bad.stderr


def test_cuda_room_check_names_what_to_lower(monkeypatch):
    """On CUDA, a cache that cannot fit fails before allocating, with a message that says what to lower."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"needs 48\.8 GiB but only 2\.0 GiB .*lower max_gen_len"):
        check_cuda_room(int(48.8 * 2**30), torch.device("cuda", 0), "the KV cache", "lower max_gen_len")
    check_cuda_room(10**12, torch.device("cpu"), "the KV cache", "lower max_gen_len")  # CPU: no check
