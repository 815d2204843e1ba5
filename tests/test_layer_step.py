"""The decoder layers' native step (llama/layer.c through llama/layer_step.py): for a few new tokens
on the CPU it computes what the model's own blocks compute, writes the same keys and values, serves
where it says it does and steps aside elsewhere (the blocks then run as written)."""

import pytest
import torch

from llama import Llama, layer_step, native
from llama.model import attention_plan
from llama.quantization import Scheme, quantize_model
from llama.tiny import write_tiny_model

NEEDS = pytest.mark.skipif(not native.available(), reason=f"the project's CPU kernels cannot serve here: {native.why_not()}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """dim 128, 4 heads of 32 over 2 KV heads, a feed-forward width of 352 (not a whole number of the
    int4 kernel's 512-column superblocks), 3 layers."""
    return write_tiny_model(tmp_path_factory.mktemp("layer_step"), dim=128, n_layers=3, n_heads=4, n_kv_heads=2,
                            vocab_size=512, seed=5)


def build(model_dir, quantize=None, group_size=None, dtype="float32"):
    return Llama.build(str(model_dir), str(model_dir / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                       device="cpu", dtype=dtype, quantize=quantize, group_size=group_size)


def blocks_only(monkeypatch):
    """Make the model run its blocks as written in llama/model.py."""
    monkeypatch.setattr(layer_step, "step", lambda *args, **kwargs: None)


def one_pass(model, tokens, start_pos):
    """(hidden states, every layer's cache) after a prompt of 12 tokens, then `tokens` at start_pos
    (an int, or one position per row)."""
    model.cache = None
    model.reserve_cache(tokens.shape[0], 64)
    prompt = torch.arange(1, 13).repeat(tokens.shape[0], 1) * 7 % 500
    with torch.inference_mode():
        model.hidden(prompt, 0)
        kv_len = None if isinstance(start_pos, int) else int(start_pos.max()) + tokens.shape[1]
        h = model.hidden(tokens, start_pos, kv_len=kv_len)
    return h, [t.clone() for t in model.cache.k + model.cache.v]


CASES = {  # (tokens, start_pos): one token, rows at their own positions, a verify pass of 4 tokens a row
    "one token": (torch.tensor([[17]]), 12),
    "ragged rows": (torch.tensor([[17], [3], [250]]), torch.tensor([12, 5, 9])),
    "four tokens a row": (torch.tensor([[17, 4, 99, 31], [8, 8, 2, 400]]), torch.tensor([12, 7])),
}


@NEEDS
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8", "int4"])
def test_native_step_computes_what_the_blocks_compute(model_dir, monkeypatch, precision, case):
    """Same hidden states (after the final norm) and caches as the blocks, within float32 rounding. Both paths run the
    same products (the project's matrix-vector kernels); they differ in the order of float32
    operations in the norms, rotations, activation and residuals (a few units of 2**-24 a value),
    and the integer kernels round x to integers of 15-16 bits per block, where such a difference
    can move one integer by one: 2**-15 of a block's largest entry, through 3 layers of a few
    products each. So float32 weights agree to 1e-5 of the largest value, int8 and int4 to 1e-3.
    A bfloat16 model rounds each operator's result to bfloat16 on both paths, where such a
    difference can move a value by one bfloat16 step (2**-8 of it); a few such steps through 3
    layers: 2**-6 of the largest value."""
    tokens, start_pos = CASES[case]
    quantized = precision in ("int8", "int4")
    model = build(model_dir, quantize=precision if quantized else None, group_size=32 if precision == "int4" else None,
                  dtype="bfloat16" if precision == "bfloat16" else "float32").model
    called = []
    real = layer_step.step
    monkeypatch.setattr(layer_step, "step", lambda *args: called.append(1) or real(*args))
    got, got_cache = one_pass(model, tokens, start_pos)
    assert called and real(model.layer_weights, *native_inputs(model, tokens, start_pos)) is not None
    blocks_only(monkeypatch)
    want, want_cache = one_pass(model, tokens, start_pos)
    tol = {"float32": 1e-5, "bfloat16": 2**-6}.get(precision, 1e-3)
    assert got.dtype == want.dtype == model.tok_embeddings.weight.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
    for a, b in zip(got_cache, want_cache):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * max(b.abs().max().item(), 1))


def native_inputs(model, tokens, start_pos):
    """The rest of layer_step.step's arguments for `tokens` at start_pos, as Transformer.hidden makes them."""
    plan = attention_plan(start_pos, tokens.shape[1], slice(0, tokens.shape[0]), tokens.device)
    with torch.inference_mode():
        return model.tok_embeddings(tokens), model.params.rope_theta, model.cache.k, model.cache.v, plan


@NEEDS
def test_greedy_answers_are_the_blocks_answers(model_dir, monkeypatch):
    """A batch of ragged prompts decoded greedily gives the same tokens either way."""
    generator = build(model_dir)
    prompts = [[1, 5, 9, 30, 77], [1, 7], [1, 300, 2, 2, 2, 2, 9, 41]]
    got = generator.generate(prompts, 12, temperature=0, stop_token=-1)[0]
    blocks_only(monkeypatch)
    assert generator.generate(prompts, 12, temperature=0, stop_token=-1)[0] == got


@NEEDS
def test_steps_aside_where_it_does_not_serve(model_dir):
    """A float16 model (activations the kernel does not take), a prompt of more tokens than the
    kernels take, and a model whose layers' projections are not joined are left to the blocks."""
    model = build(model_dir).model
    tokens = torch.tensor([[17]])
    model.reserve_cache(1, 64)
    assert layer_step.step(model.layer_weights, *native_inputs(model, tokens, 0)) is not None
    many = torch.arange(native.MAX_ROWS + 1)[None]
    assert layer_step.step(model.layer_weights, *native_inputs(model, many, 0)) is None
    group = model.layers[1].feed_forward.w13
    group.joined_float = None  # w1 and w3 applied apart
    assert layer_step.step(model.layer_weights, *native_inputs(model, tokens, 0)) is None
    group.join()
    assert layer_step.step(model.layer_weights, *native_inputs(model, tokens, 0)) is not None
    model.to(torch.float16)
    model.cache = None
    model.reserve_cache(1, 64)
    h, *rest = native_inputs(model, tokens, 0)
    assert layer_step.step(model.layer_weights, h, *rest) is None


@NEEDS
def test_weights_replaced_after_a_step_are_the_ones_read(model_dir):
    """quantize_model on a model that has already decoded: the next step reads the new weights,
    as a model quantized before its first step does."""
    tokens = torch.tensor([[17]])
    stepped = build(model_dir).model
    one_pass(stepped, tokens, 12)
    quantize_model(stepped, Scheme("int8"))
    fresh = quantize_model(build(model_dir).model, Scheme("int8"))
    assert torch.equal(one_pass(stepped, tokens, 12)[0], one_pass(fresh, tokens, 12)[0])
