"""The Transformer against an independent naive implementation, and its KV cache."""

import pytest
import torch

from llama.model import KVCache, ModelArgs, Transformer, rotary_cos_sin
from naive import NaiveLlama

PROMPT = [1, 45, 300, 12, 77, 8, 150, 9, 260, 33, 5, 90, 411, 17]


def full_logits(model: Transformer, tokens) -> torch.Tensor:
    return model.forward(torch.tensor([tokens]), 0)[0].cpu()


@pytest.mark.parametrize("fixture", ["generator", "step_generator"], ids=["gqa", "mha"])
def test_forward_matches_naive(request, fixture):
    """Logits of a full forward equal a float64 textbook implementation (GQA and MHA)."""
    gen = request.getfixturevalue(fixture)
    ckpt = request.getfixturevalue("tiny_dir" if fixture == "generator" else "tiny_step_dir")
    expected = NaiveLlama(ckpt).logits(PROMPT)
    got = full_logits(gen.model, PROMPT)
    assert got.dtype == torch.float32 and got.shape == (len(PROMPT), gen.model.vocab_size)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)


def test_token_by_token_equals_full_forward(generator):
    """KV-cached incremental decoding gives the logits of a full forward."""
    model = generator.model
    full = full_logits(model, PROMPT)
    steps = [model.forward(torch.tensor([[t]]), i)[0, 0].cpu() for i, t in enumerate(PROMPT)]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 5, 13])
def test_chunk_at_start_pos_continues_the_cache(generator, k):
    """forward(tokens[:, :k], 0) then forward(tokens[:, k:], k) equals forward(tokens, 0): the
    reference's square mask gets this wrong for several tokens at start_pos > 0."""
    model = generator.model
    full = full_logits(model, PROMPT)
    first = model.forward(torch.tensor([PROMPT[:k]]), 0)[0].cpu()
    rest = model.forward(torch.tensor([PROMPT[k:]]), k)[0].cpu()
    torch.testing.assert_close(torch.cat([first, rest]), full, atol=1e-5, rtol=0)


def test_batch_rows_are_independent(generator):
    model = generator.model
    a, b = PROMPT, PROMPT[::-1]
    both = model.forward(torch.tensor([a, b]), 0).cpu()
    torch.testing.assert_close(both[0], full_logits(model, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], full_logits(model, b), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_per_row_positions_decode(generator):
    """One new token per row at different positions (a ragged batch) equals each row alone."""
    model = generator.model
    a, b = PROMPT[:9], PROMPT[:4]
    model.reserve_cache(2, 16)
    on = {"device": model.device}
    model.hidden(torch.tensor([a, b + [0] * 5], **on), 0)  # right-padded prefill
    nxt = torch.tensor([[7], [8]], **on)
    h = model.hidden(nxt, torch.tensor([9, 4], **on))
    got = model.logits(h[:, -1]).cpu()
    torch.testing.assert_close(got[0], full_logits(model, a + [7])[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], full_logits(model, b + [8])[-1], atol=1e-5, rtol=0)


def test_positions_past_max_seq_len_are_refused(generator):
    with pytest.raises(ValueError, match="max_seq_len"):
        generator.model.forward(torch.tensor([[1, 2, 3]]), generator.model.params.max_seq_len - 2)


def test_rotary_at_large_positions_matches_float64():
    pos = torch.tensor([0, 1, 4095, 16383, 99_999])
    cos, sin = rotary_cos_sin(pos, 128, 1e6)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    angles = pos.double()[:, None] * inv
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), angles.cos(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=1e-7, rtol=0)


def test_rope_theta_comes_from_params(generator):
    """Changing rope_theta changes the output: it is read, not hard-coded."""
    model = generator.model
    before = full_logits(model, PROMPT)
    theta = model.params.rope_theta
    try:
        model.params.rope_theta = 10000.0
        after = full_logits(model, PROMPT)
    finally:
        model.params.rope_theta = theta
    assert not torch.allclose(before, after, atol=1e-3)


def test_kv_cache_grows_keeping_contents():
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, max_seq_len=1000, max_batch_size=4)
    cache = KVCache(args, n_local_kv_heads=2, dtype=torch.float32, device=torch.device("cpu"))
    assert sum(t.numel() for t in cache.k + cache.v) == 0, "nothing is reserved up front"
    cache.reserve(1, 10)
    assert (cache.batch_size, cache.seq_len) == (1, KVCache.ROUND)
    for t in cache.k:
        t.normal_()
    kept = [t.clone() for t in cache.k]
    cache.reserve(3, 600)
    assert (cache.batch_size, cache.seq_len) == (3, 768)
    assert all(torch.equal(t[:1, :, : KVCache.ROUND], old) for t, old in zip(cache.k, kept))
    cache.reserve(2, 990)
    assert cache.seq_len == 1000, "capped at max_seq_len"
    pow2 = KVCache(args, n_local_kv_heads=2, dtype=torch.float32, device=torch.device("cpu"), pow2=True)
    pow2.reserve(2, 300)
    assert pow2.seq_len == 512


def test_model_builds_on_meta_without_allocating():
    """fairscale's layers would allocate their weights; ours are declared on the meta device."""
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32016)  # a 7B shape
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 6_738_546_688
