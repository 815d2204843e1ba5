"""Projections that read the same input (a block's wq, wk and wv; w1 and w3) applied as one
product (llama/parallel.py SharedInput, kernels.join): laid out one after another by
huge_pages.move_weights, stacked as views, and giving the answers of one product each."""

import pytest
import torch

from llama import Llama, huge_pages, layer_step, native
from llama.kernels import QuantizedWeight, join, linear
from llama.parallel import shared_inputs
from llama.quantization import Scheme, kernel_weight, quantize

from device import DEVICE

CPU = torch.device("cpu")
JOINS = pytest.mark.skipif(DEVICE != "cpu" or not huge_pages.available(),
                           reason="projections are laid out to be joined on the CPU where huge pages are given")


def back_to_back(*tensors):
    """Copies of `tensors` laid one after another in one buffer (as move_weights lays them)."""
    flat = torch.empty(sum(t.nbytes for t in tensors), dtype=torch.uint8)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.nbytes].view(t.dtype).view(t.shape).copy_(t))
        at += t.nbytes
    return out


def test_join_stacks_adjacent_weights_as_views():
    g = torch.Generator().manual_seed(0)
    a, b, c = back_to_back(torch.randn(64, 96, generator=g), torch.randn(32, 96, generator=g), torch.randn(32, 96, generator=g))
    joined = join([a, b, c])
    assert joined.data_ptr() == a.data_ptr() and torch.equal(joined, torch.cat([a, b, c]))
    assert join([a, c]) is None  # not adjacent
    assert join([a.clone(), b]) is None
    x, y = back_to_back(torch.randn(8, 96, generator=g), torch.randn(8, 64, generator=g).bfloat16())
    assert join([x, y]) is None  # another dtype and width


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_join_stacks_quantized_weights_field_by_field(mode):
    if mode == "int4" and not native.takes(0, 128, CPU):
        pytest.skip(f"int4 is joined in the project's kernels' layout only: {native.why_not()}")
    g = torch.Generator().manual_seed(1)
    parts = [kernel_weight(quantize(torch.randn(n, 128, generator=g), Scheme(mode, None if mode == "int8" else 64)), CPU)
             for n in (64, 32, 32)]
    fields = [f for f in ("data", "scales", "zeros") if getattr(parts[0], f) is not None]
    laid = {f: back_to_back(*[getattr(p, f) for p in parts]) for f in fields}
    parts = [QuantizedWeight(p.format, *(laid[f][i] for f in ("data", "scales")), p.group_size, p.shape,
                             laid["zeros"][i] if "zeros" in laid else None) for i, p in enumerate(parts)]
    joined = join(parts)
    assert joined.shape == (128, 128) and joined.data.data_ptr() == parts[0].data.data_ptr()
    x = torch.randn(3, 128, generator=g)
    torch.testing.assert_close(linear(x, joined), torch.cat([linear(x, p) for p in parts], dim=-1), rtol=0, atol=0)
    assert join([parts[0], parts[2]]) is None


@JOINS
@pytest.mark.parametrize("quantize_mode", [None, "int8", "int4"])
def test_a_built_model_joins_them_and_answers_as_before(tiny_dir, quantize_mode, monkeypatch):
    """Every SharedInput of a CPU model is one product after Llama.build; undoing the joins gives
    the same answers (each output row is the same sum either way). The logits are compared with
    the blocks run as written (a joined model's few-token passes otherwise go to the native layers'
    step, whose agreement with the blocks tests/test_layer_step.py checks)."""
    def build():
        return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 64, 2, device="cpu",
                           dtype="float32", quantize=quantize_mode)

    joined, apart = build(), build()
    groups = shared_inputs(joined.model)
    assert len(groups) == 2 * joined.model.n_layers
    assert all(group.joined_float is not None or group.joined_quantized is not None for group in groups)
    for group in shared_inputs(apart.model):
        unjoin(group)
    prompts = [[1, 5, 9, 4], [1, 7]]
    assert joined.generate(prompts, 8, temperature=0, stop_token=-1) == apart.generate(prompts, 8, temperature=0, stop_token=-1)
    tokens = torch.tensor([[1, 5, 9, 4, 22, 17, 3, 8]])
    monkeypatch.setattr(layer_step, "step", lambda *args: None)
    torch.testing.assert_close(joined.model.forward(tokens, 0), apart.model.forward(tokens, 0), rtol=1e-5, atol=1e-5)


def unjoin(group):
    group.joined_float = group.joined_quantized = None


@JOINS
def test_converting_a_joined_model_converts_its_joined_weights(tiny_dir):
    """model.to(dtype) converts a joined float weight with the layers it stands for."""
    def build():
        return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 64, 1, device="cpu", dtype="float32")

    joined, apart = build(), build()
    for group in shared_inputs(apart.model):
        unjoin(group)
    tokens = torch.tensor([[1, 5, 9, 4, 22, 17, 3, 8]])
    with torch.inference_mode():
        got = joined.model.to(torch.bfloat16).forward(tokens, 0)
        want = apart.model.to(torch.bfloat16).forward(tokens, 0)
    assert shared_inputs(joined.model)[0].joined_float.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
