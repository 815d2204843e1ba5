"""The decoder layers' step for a few new tokens as one call of the project's kernel
(llama/layer.c), where it serves: Transformer.hidden tries `step` first.

Decoding a token is some 15 operators a layer: four products, two norms, two rotations, the cache
writes, attention, the activation and two residuals. On the CPU each is a few microseconds of work,
so the time goes between them: Python's dispatch (eager), and threads started and joined for each
(eager and compiled alike). llama::decode_layers runs every layer and the final norm, the same math
in float32 (the rotary angles of each token's position too, as rotary_cos_sin computes them), on
one team of threads that only wait for one another where a product's result is needed whole.

It serves where the layers are exactly what layer.c computes on what it reads: the CPU with the
project's kernels, float32 or bfloat16 activations (norms of that dtype; bfloat16 results rounded as
the blocks' bfloat16 tensors round them), a few new tokens whose positions are given
(`plan.last`), one model-parallel rank (no all-reduce between), and each projection in a layout the
kernels read (float32, bfloat16, int8, or int4 in their own layout), with wq/wk/wv and w1/w3 joined
into one weight each (laid out one after another, as Llama.build lays them). Elsewhere the layers
run as written in llama/model.py.
"""

from typing import List, Optional, Union

import torch

from llama import native
from llama.kernels import QuantizedWeight

ACTIVATIONS = (torch.float32, torch.bfloat16)  # the dtypes of h (and of the norms) the kernel takes


def parts(weight: Union[torch.Tensor, QuantizedWeight, None]) -> Optional[List[torch.Tensor]]:
    """`weight` as llama::decode_layers takes it ([data], [data, scales] or [data, scales, zeros]),
    or None where the kernels cannot read it (or there is no weight: None)."""
    if weight is None:
        return None
    if isinstance(weight, QuantizedWeight):
        if not native.takes(0, weight.shape[1], weight.device) or not weight.data.is_contiguous():
            return None
        if weight.format == "int8":
            return [weight.data, weight.scales]
        return None if weight.zeros is None else [weight.data, weight.scales, weight.zeros]  # int4: their layout only
    return [weight] if native.float_kind(weight, 0) is not None else None


def weights(layers, final_norm) -> Optional[List[torch.Tensor]]:
    """Every layer's norms' weights and the final norm's, then every layer's projections (qkv, wo,
    w13, w2) as `parts`, as llama::decode_layers takes them; None where some layer is not what it
    computes."""
    first = layers[0].attention_norm
    if first.weight.dtype not in ACTIVATIONS:
        return None
    norms, projections = [], []
    for layer in layers:
        attention, ffn = layer.attention, layer.feed_forward
        if attention.wo.input_size_per_partition != attention.wo.in_features:  # split over ranks
            return None
        norms += [layer.attention_norm, layer.ffn_norm]
        for weight in (attention.wqkv.joined(), attention.wo.weight, ffn.w13.joined(), ffn.w2.weight):
            p = parts(weight)
            if p is None:
                return None
            projections += p
    norms.append(final_norm)
    if any((norm.weight.dtype, norm.eps) != (first.weight.dtype, first.eps) for norm in norms):  # one dtype, one eps
        return None
    return [norm.weight for norm in norms] + projections


class LayerWeights:
    """`weights(layers, final_norm)`, gathered once (walking the modules costs ~0.1 ms a step) and
    again when a layer's joined weights change: whatever replaces or converts a projection's weight
    rejoins the layer's SharedInputs (Llama.build, quantize_model) or converts their joined float
    weights with it (model.to), which makes new joined weights; the norms' Parameters stay the same
    objects."""

    def __init__(self, layers, final_norm):
        self.layers, self.final_norm = layers, final_norm
        self.groups = [group for layer in layers for group in (layer.attention.wqkv, layer.feed_forward.w13)]
        self.joined: Optional[list] = None  # the groups' joined weights when gathered
        self.tensors: Optional[List[torch.Tensor]] = None

    def get(self) -> Optional[List[torch.Tensor]]:
        joined = [group.joined() for group in self.groups]
        if self.joined is None or any(a is not b for a, b in zip(joined, self.joined)):
            self.joined, self.tensors = joined, weights(self.layers, self.final_norm)
        return self.tensors


def takes(x: torch.Tensor, cache_k: torch.Tensor, plan) -> bool:
    """Whether the kernel may take x (B, T, dim) with this cache (one layer's) and plan at all."""
    return (plan.last is not None and x.device.type == "cpu" and x.dtype in ACTIVATIONS
            and native.takes(x.shape[0] * x.shape[1], x.shape[-1], x.device)
            and cache_k.dtype in native.ATTENTION_DTYPES and cache_k.stride(-1) == 1 and cache_k.shape[-1] % 16 == 0)


def step(layers: LayerWeights, x: torch.Tensor, rope_theta: float, cache_k: List[torch.Tensor],
         cache_v: List[torch.Tensor], plan) -> Optional[torch.Tensor]:
    """x (B, T, dim) after the TransformerBlocks of `layers` and the final norm, the tokens' keys and
    values written into each layer's cache (cache_k[i], cache_v[i]); None (nothing done) where the
    kernel does not serve. rope_theta: the rotary angles' base (ModelArgs.rope_theta)."""
    if not takes(x, cache_k[0], plan):
        return None
    tensors = layers.get()
    if tensors is None or tensors[0].dtype != x.dtype:  # norms of the activations' dtype
        return None
    if (plan.rows.start, plan.rows.stop) != (0, cache_k[0].shape[0]):
        cache_k, cache_v = [c[plan.rows] for c in cache_k], [c[plan.rows] for c in cache_v]
    n = 2 * len(layers.layers) + 1
    first = layers.layers[0]
    return torch.ops.llama.decode_layers(x.contiguous(), tensors[:n], first.attention_norm.eps, tensors[n:],
                                         float(rope_theta), cache_k, cache_v, plan.last.contiguous(),
                                         first.attention.n_local_heads)
