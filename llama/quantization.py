"""Weight-only quantization of the Transformer's projections (wq wk wv wo w1 w2 w3; the embedding and
the output layer stay in full precision): the two schemes, float weights to quantized values and
back, how a quantized checkpoint names and declares them, and their placement into a model's
parallel layers as kernels.QuantizedWeight.

- int8: symmetric, one scale per output row: w = q * scale, q in [-127, 127].
- int4: asymmetric, a scale and a zero per group of `group_size` input columns:
  w = (q - 8) * scale + zero, q in [0, 15] (what PyTorch's int4 kernels compute).

Scales and zeros are bfloat16, the kernels' own dtype, and the values are rounded against those very
scales, each rounded up so that its grid still spans the whole row or group: every weight lies within
half a step (scale / 2) of its dequantized value.

Weights a GGUF file stores on 4-bit grids of 32 columns (Q4_0, Q4_1, Q4_K) are not quantized again
for int4 in groups of 32 (the default for such a file): their codes are kept, with the grids' scales
and zeros rounded to bfloat16 (`from_grids`); the projections such a file stores with more bits are
held in int8, with those that read the same input (`Scheme.int8`, chosen by
loading.finer_projections).

Each model-parallel rank quantizes its own slice. An int4 group never crosses a slice (the group size
must divide every local input width). The rows of a row-parallel layer (wo, w2) are split over the
ranks: their int8 scale comes from the whole row (a MAX over the ranks), so a slice quantizes
exactly as the whole weight does, and a quantized checkpoint splits over any degree like a full one.

A quantized checkpoint is Meta's layout in which each projection's `<name>.weight` holds the values,
unpacked, one a byte (int8; uint8 for int4), beside `<name>.scale` and, for int4, `<name>.zero`
(both bfloat16); params.json declares the scheme under "quantization", e.g. {"mode": "int4",
"group_size": 64}. Values are packed for a device's kernel as they load.
"""

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from llama.checks import is_int
from llama.kernels import QuantizedWeight, int4_weight, int8_weight
from llama.model import ModelArgs
from llama.parallel import all_reduce, join_shared_inputs, set_weight, shard_dim

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # the int4 group sizes PyTorch's kernels take
DEFAULT_GROUP_SIZES = (128, 64, 32)  # the first that divides every local input width is the default
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the layers quantized
PARAMS_KEY = "quantization"  # where params.json declares the scheme
SCALE_DTYPE = torch.bfloat16
VALUE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}  # how a checkpoint stores the values


@dataclass(frozen=True)
class Scheme:
    """How the projections are quantized."""

    mode: str  # "int8" or "int4"
    group_size: Optional[int] = None  # int4: input columns that share a scale and a zero
    int8: FrozenSet[str] = frozenset()  # int4: projections (checkpoint keys) held in int8 instead (finer_projections)

    def for_key(self, key: str) -> "Scheme":
        """The scheme projection `key` is held in."""
        return Scheme("int8") if key in self.int8 else self

    def describe(self) -> str:
        text = self.mode if self.group_size is None else f"{self.mode} in groups of {self.group_size}"
        n = len(self.int8)
        return text + (f", {n} projection{'s' * (n > 1)} in int8" if n else "")

    def to_json(self) -> dict:
        """What params.json records under "quantization"."""
        out = {"mode": self.mode} if self.group_size is None else {"mode": self.mode, "group_size": self.group_size}
        return {**out, "int8": sorted(self.int8)} if self.int8 else out


@dataclass
class QuantizedTensors:
    """One quantized weight as a checkpoint stores it: its values unpacked, one a byte, its scales
    and (int4) zeros."""

    scheme: Scheme
    values: torch.Tensor  # (N, K): int8 in [-127, 127], or uint8 in [0, 15] for int4
    scale: torch.Tensor  # bfloat16: (N,) for int8, (N, K / group_size) for int4
    zero: Optional[torch.Tensor] = None  # int4: bfloat16 (N, K / group_size), the value of code 8


# Schemes --------------------------------------------------------------------------------------------


def check_request(quantize: Optional[str], group_size: Optional[int]) -> None:
    """Raise, saying what is accepted, unless `quantize` and `group_size` name a scheme."""
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"unknown quantize={quantize!r}; use 'int8', 'int4' or None (full precision)")
    if group_size is None:
        return
    if quantize != "int4":
        raise ValueError(f"group_size={group_size!r} applies to quantize='int4' only (int8 has a scale per row); "
                         "leave it out")
    if not is_int(group_size) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not one PyTorch's int4 kernels take: use one of "
                         f"{', '.join(map(str, GROUP_SIZES))}, or leave it out for the largest that fits")


def input_widths(args: ModelArgs, mp_size: int) -> Dict[str, int]:
    """Each projection's input width on one of `mp_size` model-parallel ranks (row-parallel layers
    split theirs)."""
    column = {name: args.dim for name in ("wq", "wk", "wv", "w1", "w3")}
    return {**column, "wo": args.n_heads * args.head_dim // mp_size, "w2": args.ffn_hidden_dim // mp_size}


def group_sizes_that_fit(widths: Dict[str, int]) -> List[int]:
    """The int4 group sizes that divide every width in `widths`."""
    return [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]


def check_groups(group_size: int, widths: Dict[str, int], what: str) -> None:
    """Raise unless `group_size` divides every local input width: an int4 group never crosses a
    model-parallel rank's slice. `what` names the group size in the message."""
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        fits = ", ".join(map(str, group_sizes_that_fit(widths))) or "none (use int8)"
        raise ValueError(
            f"{what} {group_size} does not divide the input width of {', '.join(f'{n} ({w})' for n, w in bad.items())} "
            f"on each model-parallel process (int4 groups never cross a process's slice); group sizes that fit: {fits}"
        )


def choose_scheme(quantize: str, group_size: Optional[int], widths: Dict[str, int],
                  stored_group: Optional[int] = None) -> Scheme:
    """The scheme for `quantize` ("int8" or "int4"): an int4 group size checked against the local
    input widths, or by default `stored_group` (the group size of the 4-bit grids the checkpoint
    stores its projections in, a GGUF file's: kept as they are) where it fits, else the largest of
    128, 64, 32 that divides them all."""
    check_request(quantize, group_size)
    if quantize == "int8":
        return Scheme("int8")
    if group_size is None:
        fits = group_sizes_that_fit(widths)
        group_size = next((g for g in (stored_group, *DEFAULT_GROUP_SIZES) if g in fits), DEFAULT_GROUP_SIZES[-1])
    check_groups(group_size, widths, "int4 group size")
    return Scheme("int4", group_size)


def declared_scheme(params: dict, where: str) -> Optional[Scheme]:
    """The scheme params.json declares under "quantization" (None: full-precision weights)."""
    raw = params.get(PARAMS_KEY)
    if raw is None:
        return None
    mode = raw.get("mode") if isinstance(raw, dict) else None
    group_size = raw.get("group_size") if isinstance(raw, dict) else None
    int8 = raw.get("int8", []) if isinstance(raw, dict) else None
    sized = is_int(group_size) and group_size in GROUP_SIZES
    listed = isinstance(int8, list) and all(isinstance(k, str) and is_projection(k) for k in int8)
    if (mode not in MODES or (mode == "int4") != sized or set(raw) - {"mode", "group_size", "int8"} or not listed
            or (int8 and mode != "int4")):
        raise ValueError(
            f"{where}: {PARAMS_KEY!r} must be {{\"mode\": \"int8\"}} or {{\"mode\": \"int4\", \"group_size\": G}} with G "
            f"one of {', '.join(map(str, GROUP_SIZES))} (and, int4, \"int8\": a list of projections held in int8), as "
            f"python -m llama.quantize writes it; got {raw!r}"
        )
    return Scheme(mode, group_size, frozenset(int8))


def refuse_quantized(params: dict, where: str, what: str) -> None:
    """Raise if the checkpoint whose params.json is `params` holds quantized weights: `what` (a
    conversion, quantizing again) needs full-precision ones."""
    scheme = declared_scheme(params, where)
    if scheme is not None:
        raise ValueError(
            f"{where} holds weights already quantized ({scheme.describe()}): {what} needs a full-precision "
            "checkpoint; use the one it was quantized from"
        )


def resolve_scheme(quantize: Optional[str], group_size: Optional[int], declared: Optional[Scheme],
                   widths: Dict[str, int], where: str, stored_group: Optional[int] = None) -> Optional[Scheme]:
    """The scheme a build runs with: the checkpoint's own (`declared`), or `quantize` applied as a
    full-precision checkpoint loads; None for full precision. `widths`: the local input widths;
    stored_group: see choose_scheme."""
    if declared is None:
        return None if quantize is None else choose_scheme(quantize, group_size, widths, stored_group)
    if quantize not in (None, declared.mode) or group_size not in (None, declared.group_size):
        raise ValueError(
            f"{where} declares weights already quantized ({declared.describe()}); build with quantize=None to run "
            f"them as they are, or quantize the full-precision checkpoint as {quantize!r}"
        )
    if declared.mode == "int4":
        check_groups(declared.group_size, widths, f"{where}: the checkpoint's int4 group size")
    return declared


# Keys of a quantized checkpoint ---------------------------------------------------------------------


JOINED = (("wq", "wk", "wv"), ("w1", "w3"))  # projections that read one input: one product (model.SharedInput)


def input_group(key: str) -> List[str]:
    """Projection `key` and the projections of its layer that read the same input (JOINED), e.g.
    layers.0.attention.wv.weight -> that layer's wq, wk and wv."""
    parts = key.split(".")
    names = next((names for names in JOINED if parts[3] in names), (parts[3],))
    return [".".join([*parts[:3], name, *parts[4:]]) for name in names]


def is_projection(key: str) -> bool:
    """Whether checkpoint tensor `key` is a quantized layer's weight, e.g. layers.0.attention.wq.weight."""
    parts = key.split(".")
    return parts[0] == "layers" and len(parts) == 5 and parts[3] in PROJECTIONS and parts[4] == "weight"


def stored_tensors(key: str, shape: Tuple[int, int],
                   scheme: Scheme) -> Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]]:
    """The tensors a quantized checkpoint holds for projection `key` of shape (N, K) (on one rank):
    name -> (shape, dtype; None: any floating point)."""
    n, k = shape
    base = key[: -len(".weight")]
    if scheme.mode == "int8":
        return {key: ((n, k), torch.int8), f"{base}.scale": ((n,), None)}
    groups = (n, k // scheme.group_size)
    return {key: ((n, k), torch.uint8), f"{base}.scale": (groups, None), f"{base}.zero": (groups, None)}


def as_state(key: str, t: QuantizedTensors) -> Dict[str, torch.Tensor]:
    """Projection `key`'s tensors under their checkpoint names."""
    base = key[: -len(".weight")]
    state = {key: t.values, f"{base}.scale": t.scale}
    if t.zero is not None:
        state[f"{base}.zero"] = t.zero
    return state


# The math -------------------------------------------------------------------------------------------


def round_up(x: torch.Tensor) -> torch.Tensor:
    """x (float32, positive, finite) rounded up to bfloat16: no smaller than x. (The next bfloat16
    above a positive one is the one whose bits, read as an integer, are one more.)"""
    r = x.to(SCALE_DTYPE)
    return torch.where(r.float() < x, (r.view(torch.int16) + 1).view(SCALE_DTYPE), r)


def row_absmax(w: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of each row of w (N, K) -> (N,), float32."""
    return w.float().abs().amax(dim=1)


def quantize_int8(w: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> QuantizedTensors:
    """w (N, K) -> int8 values and a scale per row. absmax: each row's largest magnitude when w is a
    slice of the rows' columns (default: w's own)."""
    absmax = row_absmax(w) if absmax is None else absmax
    scale = round_up((absmax / 127).clamp(min=torch.finfo(SCALE_DTYPE).tiny))  # (N,)
    values = (w.float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return QuantizedTensors(Scheme("int8"), values, scale)


def quantize_int4(w: torch.Tensor, group_size: int) -> QuantizedTensors:
    """w (N, K) -> values in [0, 15], a scale and a zero per group of `group_size` columns."""
    g = w.float().unflatten(1, (-1, group_size))  # (N, K / G, G)
    lo, hi = g.amin(-1), g.amax(-1)
    zero = (lo + 8 * (hi - lo) / 15).to(SCALE_DTYPE)  # the value of code 8
    z = zero.float()
    step = torch.maximum((z - lo) / 8, (hi - z) / 7)  # so that z + (q - 8) * step spans [lo, hi]
    scale = round_up(step.clamp(min=torch.finfo(SCALE_DTYPE).tiny))
    values = ((g - z[..., None]) / scale.float()[..., None]).round().add(8).clamp(0, 15).to(torch.uint8)
    return QuantizedTensors(Scheme("int4", group_size), values.flatten(1), scale, zero)


def from_grids(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> QuantizedTensors:
    """int4 groups of weights stored on 4-bit grids, value = scale * code + low (codes (N, K) in 0..15;
    scale, low (N, K / G) float32, a GGUF file's Q4_0, Q4_1 or Q4_K blocks): the same codes, the
    grids' scale and zero (the value of code 8, low + 8 scale) rounded to bfloat16, which moves a
    weight by at most (8 |scale| + |zero|) 2^-8 (bfloat16 keeps 8 significant bits): a 32nd of a
    step for Q4_0 (zero 0), a 16th where |zero| <= 8 |scale| (quantizing the values again would move
    them by up to half a step, onto another grid)."""
    group_size = codes.shape[1] // scale.shape[1]
    zero = (low + 8 * scale).to(SCALE_DTYPE)
    return QuantizedTensors(Scheme("int4", group_size), codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero)


def quantize(w: torch.Tensor, scheme: Scheme, absmax: Optional[torch.Tensor] = None) -> QuantizedTensors:
    """w (N, K) quantized by `scheme`; absmax: int8's row maxima when w holds part of each row."""
    if scheme.mode == "int8":
        return quantize_int8(w, absmax)
    return quantize_int4(w, scheme.group_size)


def dequantize(t: QuantizedTensors) -> torch.Tensor:
    """The float32 weight (N, K) that `t` stands for: what the kernels multiply by."""
    if t.scheme.mode == "int8":
        return t.values.float() * t.scale.float()[:, None]
    g = (t.values.float() - 8).unflatten(1, (-1, t.scheme.group_size))
    return (g * t.scale.float()[..., None] + t.zero.float()[..., None]).flatten(1)


def quantize_shard(key: str, w: torch.Tensor, scheme: Scheme) -> QuantizedTensors:
    """This model-parallel rank's slice `w` of projection `key`, quantized: a row-parallel layer's
    int8 scales come from whole rows, whose largest magnitudes the ranks share (a MAX over them)."""
    absmax = None
    if scheme.mode == "int8" and shard_dim(key) == 1:
        absmax = all_reduce(row_absmax(w), op=dist.ReduceOp.MAX)
    return quantize(w, scheme, absmax)


def quantized_bytes(n: int, k: int, scheme: Scheme) -> int:
    """Bytes of an (n, k) projection as the kernels hold it: int8 one byte a value, int4 two values
    a byte; bfloat16 scales (and zeros)."""
    if scheme.mode == "int8":
        return n * k + 2 * n
    return n * k // 2 + 4 * n * (k // scheme.group_size)


# Placing them into a model --------------------------------------------------------------------------


def kernel_weight(t: QuantizedTensors, device: torch.device) -> QuantizedWeight:
    """`t` laid out for its kernel on `device` (int4 packed for the device)."""
    if t.scheme.mode == "int8":
        return int8_weight(t.values, t.scale, device)
    return int4_weight(t.values, t.scale, t.zero, t.scheme.group_size, device)


def install(model: nn.Module, key: str, weight: QuantizedWeight) -> None:
    """Give the layer whose weight is checkpoint tensor `key` the quantized `weight` in its place."""
    set_weight(model.get_submodule(key[: -len(".weight")]), weight)


def quantize_model(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Quantize a built model's projections in place, one at a time, each rank its own slices (what
    Llama.build(quantize=...) does as the weights load); returns the model."""
    for key, weight in list(model.state_dict().items()):
        if is_projection(key):
            install(model, key, kernel_weight(quantize_shard(key, weight, scheme.for_key(key)), weight.device))
    join_shared_inputs(model)  # their joined float weights are stale
    return model
