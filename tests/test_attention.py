"""Attention over the KV cache (llama/attention.py, llama/attention.c): the project's kernel for a
few new tokens against float64 attention within a bound derived from float32 rounding, on ragged
rows, grouped-query heads, strided cache views and position ranges split across threads; the seam
choosing it only where it serves, and PyTorch's attention giving the same answers."""

import pytest
import torch

from llama import attention, native

NEEDS = pytest.mark.skipif(not native.available(), reason=f"the project's CPU kernels cannot serve here: {native.why_not()}")
U32 = 2.0**-24  # float32's unit roundoff
U16 = 2.0**-8  # bfloat16's


def reference(q, keys, values, last):
    """float64 attention, query t of row b over positions 0 .. last[b, t], head h on KV head h // g."""
    b_, t_, h_, d = q.shape
    g = h_ // keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    bound = torch.empty(q.shape[:3], dtype=torch.float64)
    for b in range(b_):
        for t in range(t_):
            n = int(last[b, t]) + 1
            for h in range(h_):
                k, v = keys[b, h // g, :n].double(), values[b, h // g, :n].double()
                qh = q[b, t, h].double()
                p = ((k @ qh) / d**0.5).softmax(0)
                out[b, t, h] = p @ v
                # float32: each score is off by at most D u of sum |q_e k_e| / sqrt(D) (a dot of D
                # terms), which moves each weight by twice that relatively (numerator and sum), the
                # exp polynomial and the sums of n weights and values by (n + 8) u more
                ds = (d * U32 * (k.abs() @ qh.abs()) / d**0.5).max()
                bound[b, t, h] = v.abs().max() * (2 * ds + (n + 8) * U32) * 2
    return out, bound


def cache(b, hkv, s, d, dtype, seed):
    """Keys and values as the model holds them: views of a larger cache (other rows, more positions)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b + 2, hkv, s + 40, d, generator=g).to(dtype)
    v = torch.randn(b + 2, hkv, s + 40, d, generator=g).to(dtype)
    return k[1 : b + 1, :, :s], v[1 : b + 1, :, :s]


CASES = [  # (B, T, H, H_kv, D, S, last)
    (1, 1, 16, 4, 64, 100, [[37]]),  # one decode token, 4 query heads a KV head
    (1, 1, 9, 3, 64, 300, [[299]]),  # SmolLM2's heads; the positions split across threads
    (3, 4, 8, 8, 128, 300, [[0, 1, 2, 3], [250, 251, 252, 253], [70, 71, 72, 73]]),  # a verify pass, ragged rows
    (2, 1, 6, 2, 32, 700, [[5], [699]]),  # one short row beside a long one
    (1, 2, 4, 1, 32, 700, [[10, 699]]),  # one KV head: its positions split in ranges (two a thread at least),
    #                                       of which the first query sees only the first
    (2, 3, 4, 1, 16, 40, [[0, 1, 2], [39, 39, 39]]),  # one KV head for all; padding rows repeat a position
    # 8 or more queries a KV head: the queries in vector lanes (attention.c unit_lanes)
    (2, 16, 9, 3, 64, 600, [list(range(584, 600)), list(range(100, 116))]),  # SmolLM2 verifying 15 drafts: 3 vectors
    (1, 5, 8, 2, 128, 500, [[3, 200, 201, 450, 499]]),  # 20 queries: a partly filled second vector; some
    #                                                      queries see none of a thread's range of positions
    (1, 16, 32, 2, 16, 80, [list(range(64, 80))]),  # 256 queries a KV head, the most in lanes
    (1, 16, 34, 2, 16, 50, [list(range(34, 50))]),  # 272: past it, one query at a time again
]


@NEEDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_attention(case, dtype):
    b, t, h, hkv, d, s, last = case
    keys, values = cache(b, hkv, s, d, dtype, seed=s)
    q = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    last = torch.tensor(last)
    assert native.attention_takes(q, keys, values)
    got = native.attend(q, keys, values, last)
    want, bound = reference(q, keys, values, last)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.bfloat16:  # the result is rounded to bfloat16 at the end
        bound = bound + want.abs().amax(-1) * U16
    err = (got.double() - want).abs().amax(-1)
    assert (err <= bound).all(), f"largest error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@NEEDS
def test_positions_past_the_keys_are_never_read():
    """last beyond the keys' length sees all S of them (the cache past them is never read)."""
    keys, values = cache(1, 2, 50, 32, torch.float32, seed=3)
    q = torch.randn(1, 1, 4, 32)
    got = native.attend(q, keys, values, torch.tensor([[10_000]]))
    want, _ = reference(q, keys, values, torch.tensor([[49]]))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@NEEDS
def test_seam_takes_the_kernel_for_few_tokens_and_gives_pytorchs_answers(monkeypatch):
    calls, real = [], native.attend
    monkeypatch.setattr(native, "attend", lambda *a: calls.append(a) or real(*a))
    keys, values = cache(2, 2, 64, 32, torch.float32, seed=5)
    q = torch.randn(2, 3, 6, 32)
    last = torch.tensor([[40, 41, 42], [61, 62, 63]])
    mask = torch.arange(64) <= last[:, :, None]  # (B, T, S)
    plain = attention.attend(q, keys, values, mask[:, None], False, None)  # PyTorch's: no `last`
    assert not calls
    ours = attention.attend(q, keys, values, mask[:, None], False, last)
    assert len(calls) == 1
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    many = torch.randn(2, native.MAX_ROWS + 1, 6, 32)
    assert not native.attention_takes(many, keys, values)  # a prompt goes to PyTorch's attention
