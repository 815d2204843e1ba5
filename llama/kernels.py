"""`linear`: the one seam every projection of the model goes through, and the low-precision weight
formats it applies with PyTorch's own kernels.

Every weight matrix of the Transformer is applied here, so a new weight format or a faster kernel
for a device plugs in at this one place. A projection's weight is a float tensor, or a
`QuantizedWeight`: int8 values with a scale per output row (`torch.ops.aten._weight_int8pack_mm`),
or 4-bit values with a scale and a zero per group of input columns, packed for the device's int4
kernel (`_weight_int4pack_mm_for_cpu` on the CPU, `_weight_int4pack_mm` on CUDA). Both kernels
take bfloat16 activations (PyTorch's int8 kernel is about 10x slower on float32 ones on the CPU)
and accumulate in float32; results come back in the activations' dtype.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = torch.bfloat16  # what the quantized kernels multiply; also the dtype of their scales
INT4_DEVICES = "the CPU, or a CUDA GPU of compute capability 8.0 or newer (A100, H100, RTX 30xx and later)"


@dataclass(frozen=True)
class QuantizedWeight:
    """A projection's (out_features, in_features) weight in a low-precision format, laid out for
    PyTorch's kernel on its device: what a parallel layer holds in place of its float weight."""

    format: str  # "int8" or "int4"
    data: torch.Tensor  # int8: (N, K) int8; int4: the device's packed 4-bit layout (opaque)
    scales: torch.Tensor  # int8: (N,) scales; int4: (K / group_size, N, 2) scales and zeros; bfloat16
    group_size: int  # input columns that share a scale (int8: all K of a row)
    shape: Tuple[int, int]  # (N, K) of the float weight it stands for

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of values and scales (what one matrix-vector product reads)."""
        return self.data.nbytes + self.scales.nbytes


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x W^T, for a float weight (N, K) or a QuantizedWeight. On the CPU, a few rows (decoding a
    small batch) of a float product go 2-3x faster as (W x^T)^T: MKL's kernels for a short, wide
    left operand are slow there."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight)
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and 1 < rows <= 128:
        return (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x W^T with W quantized: the activations in bfloat16, the result in x's dtype."""
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
