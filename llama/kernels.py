"""`linear`: the one seam every projection of the model goes through, and the low-precision weight
formats it applies.

Every weight matrix of the Transformer is applied here, so a new weight format or a faster kernel
for a device plugs in at this one place. A projection's weight is a float tensor, or a
`QuantizedWeight`: int8 values with a scale per output row, or 4-bit values with a scale and a
zero per group of input columns. Which kernel multiplies:
- on the CPU, a few rows (decoding): the project's own matrix-vector kernels (llama/native.py,
  llama/gemv.c), which read the weights at about the memory's bandwidth, for every format;
- otherwise PyTorch's: `F.linear` for float weights, `torch.ops.aten._weight_int8pack_mm` for
  int8, and for int4 `_weight_int4pack_mm(_for_cpu)` on its packed layout (on a CPU with the
  project's kernels, int4 is held in theirs); on the CPU many rows (a prompt) multiply the
  weights widened to bfloat16 with PyTorch's bfloat16 product, which beats its int8 and int4
  kernels there (int8 values are exact in bfloat16; int4's dequantized values are rounded to it),
  or to float32 on a CPU without native bfloat16 products (`wide_dtype`: 3x faster there).
PyTorch's quantized kernels take bfloat16 activations (its int8 kernel is about 10x slower on
float32 ones on the CPU), the project's take them rounded to integers per block (int8: int16 per
128 columns; int4: 15-bit per 32 columns; more precise than bfloat16); all accumulate in float32,
and results come back in the activations' dtype.
"""

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from llama import native

ACTIVATIONS = torch.bfloat16  # what the quantized kernels multiply; also the dtype of their scales
INT4_DEVICES = "the CPU, or a CUDA GPU of compute capability 8.0 or newer (A100, H100, RTX 30xx and later)"


@dataclass(frozen=True)
class QuantizedWeight:
    """A projection's (out_features, in_features) weight in a low-precision format, laid out for
    PyTorch's kernel on its device: what a parallel layer holds in place of its float weight."""

    format: str  # "int8" or "int4"
    data: torch.Tensor  # int8: (N, K) int8; int4: a packed 4-bit layout (opaque)
    scales: torch.Tensor  # int8: (N,) scales; int4: PyTorch's (K / group_size, N, 2) scales and zeros,
    #                       or the project's kernels' (N, K / group_size) scales; bfloat16
    group_size: int  # input columns that share a scale (int8: all K of a row)
    shape: Tuple[int, int]  # (N, K) of the float weight it stands for
    zeros: Optional[torch.Tensor] = None  # int4 in the project's kernels' layout: (N, K / group_size)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of values and scales (what one matrix-vector product reads)."""
        return self.data.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes)


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX: Intel Sapphire
    Rapids, AMD Zen 4 and later). Elsewhere (Intel Ice Lake, say) PyTorch's bfloat16 products run
    at about a third of its float32 ones."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return probe is None or bool(probe())


def wide_dtype(device: torch.device) -> torch.dtype:
    """What many rows (a prompt) of a quantized product are multiplied in: bfloat16, or float32 on
    a CPU that does not multiply bfloat16 natively."""
    return ACTIVATIONS if device.type != "cpu" or cpu_multiplies_bfloat16() else torch.float32


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x W^T, for a float weight (N, K) or a QuantizedWeight. On the CPU, a few rows (decoding a
    small batch) of a float product go 2-3x faster as (W x^T)^T: MKL's kernels for a short, wide
    left operand are slow there."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight)
    rows = x.numel() // x.shape[-1]
    kind = native.float_kind(weight, rows)
    if kind is not None:
        return native.matvec(x, kind, weight)
    if x.device.type == "cpu" and 1 < rows <= 128:
        return (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def join(weights) -> Union[torch.Tensor, QuantizedWeight, None]:
    """One weight standing for `weights` stacked by output rows, as views of the memory they
    already occupy, so that one product computes them all: where they are float tensors of one
    dtype, or QuantizedWeights of one format and group size in a row-wise layout (int8, or int4
    in the project's kernels' layout), all of one input width, and each tensor of each lies right
    after the previous one's (huge_pages.move_weights lays out the projections that read the same
    input so). None otherwise."""
    first = weights[0]
    if isinstance(first, QuantizedWeight):
        if not all(isinstance(w, QuantizedWeight) for w in weights) or (first.format == "int4" and first.zeros is None):
            return None
        if len({(w.format, w.group_size, w.shape[1]) for w in weights}) != 1:
            return None
        fields = {f: stacked([getattr(w, f) for w in weights]) for f in ("data", "scales", "zeros")
                  if getattr(first, f) is not None}
        if None in fields.values():
            return None
        return QuantizedWeight(first.format, fields["data"], fields["scales"], first.group_size,
                               (sum(w.shape[0] for w in weights), first.shape[1]), fields.get("zeros"))
    if not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return None
    if len({(w.dtype, w.shape[1]) for w in weights}) != 1:
        return None
    return stacked([w.detach() for w in weights])


def stacked(tensors) -> Optional[torch.Tensor]:
    """`tensors` (contiguous, one dtype, equal trailing sizes) concatenated along dimension 0, as a
    view of the memory they occupy; None unless each starts where the previous one ends."""
    first = tensors[0]
    for a, b in zip(tensors, tensors[1:]):
        if not (a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype and a.device == b.device
                and a.shape[1:] == b.shape[1:] and b.data_ptr() == a.data_ptr() + a.nbytes):
            return None
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x W^T with W quantized: the activations in bfloat16, the result in x's dtype."""
    rows = x.numel() // x.shape[-1]
    n, k = weight.shape
    if weight.zeros is not None:  # int4 in the project's kernels' layout
        if rows <= native.MAX_ROWS or torch.compiler.is_compiling():
            return native.matvec(x, "int4", weight.data, weight.scales, weight.zeros, weight.group_size, n)
        wide = wide_dtype(weight.device)
        w = native.dequantize_int4(weight.data, weight.scales, weight.zeros, weight.group_size, weight.shape, wide)
        return F.linear(x.to(wide), w).to(x.dtype)
    if weight.format == "int8" and weight.device.type == "cpu":
        if native.takes(rows, k, weight.device):
            return native.matvec(x, "int8", weight.data, weight.scales)
        if rows > native.MAX_ROWS:  # PyTorch's bfloat16 product beats its int8 kernel here (2.5x at 512 rows)
            wide = wide_dtype(weight.device)  # int8 values are exact in bfloat16
            y = F.linear(x.to(wide), weight.data.to(wide))
            return (y.float() * weight.scales.float()).to(x.dtype)
    a = x.reshape(-1, x.shape[-1]).to(ACTIVATIONS).contiguous()  # (rows, K)
    if weight.format == "int8":
        y = torch.ops.aten._weight_int8pack_mm(a, weight.data, weight.scales)
    elif weight.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, weight.data, weight.group_size, weight.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm(a, weight.data, weight.group_size, weight.scales)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def quantized_device_problem(mode: str, device: torch.device) -> Optional[str]:
    """Why `device` has no kernel for `mode` ("int8" or "int4"), saying what would work; None if it has."""
    if device.type not in ("cpu", "cuda"):
        works = INT4_DEVICES if mode == "int4" else "the CPU or a CUDA GPU"
        return (f"quantize={mode!r} has no kernel on {device.type} (PyTorch's weight-only {mode} kernels run on "
                f"{works}); build with device='cpu', or without quantize")
    if device.type == "cpu":
        return None
    op = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA"):
        return (f"this PyTorch ({torch.__version__}) has no CUDA kernel for {op}, which quantize={mode!r} uses: "
                "install a newer PyTorch, or build with device='cpu'")
    if mode == "int4" and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"quantize='int4' needs {INT4_DEVICES}; {torch.cuda.get_device_name(device)} is sm{major}{minor}: "
                "use quantize='int8', or device='cpu'")
    return None


def int8_weight(values: torch.Tensor, scales: torch.Tensor, device: torch.device) -> QuantizedWeight:
    """The int8 kernel's weight: `values` (N, K) int8 and one scale per row (N,), on `device`.
    Values already there in the layout (a memory-mapped checkpoint tensor on the CPU) are used
    as they are, not copied."""
    data = values.to(device).contiguous()
    return QuantizedWeight("int8", data, scales.to(device, ACTIVATIONS).contiguous(), values.shape[1],
                           tuple(values.shape))


def int4_weight(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                device: torch.device) -> QuantizedWeight:
    """The int4 kernel's weight on `device`: `values` (N, K) in [0, 15] (any integer dtype), and
    per group of `group_size` input columns a scale and a zero (N, K / group_size); the weight is
    (values - 8) * scale + zero. Packed here, for the device: the layouts differ."""
    n, k = values.shape
    if native.takes(0, k, device):  # held in the kernels' layout on the CPU
        # copies, so that no tensor here keeps a memory-mapped checkpoint file (and what was read of it) alive
        return QuantizedWeight("int4", native.pack_int4(values), scales.to(ACTIVATIONS, copy=True), group_size,
                               (n, k), zeros.to(ACTIVATIONS, copy=True))
    if n % 16:
        raise ValueError(
            f"PyTorch's int4 kernels need a multiple of 16 output rows per process; a projection here has {n}: "
            "use quantize='int8' (or fewer model-parallel processes)"
        )
    if device.type == "cpu":
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32).contiguous(), 1)
    else:  # CUDA's kernel packs from bytes holding two values, the even column in the high half
        v = values.to(device, torch.uint8)
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        data = torch.ops.aten._convert_weight_to_int4pack((v[:, ::2] << 4 | v[:, 1::2]).contiguous(), tiles)
    pairs = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (K / group_size, N, 2)
    return QuantizedWeight("int4", data, pairs.to(device, ACTIVATIONS).contiguous(), group_size, (n, k))
