"""`linear`: the one seam every projection of the model goes through.

Every weight matrix of the Transformer is applied here, so a new weight format (int8, int4)
or a faster kernel for a device plugs in at this one place.
"""

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T. On the CPU, a few rows (decoding a small batch) go 2-3x faster as (W x^T)^T: MKL's
    kernels for a short, wide left operand are slow there."""
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and 1 < rows <= 128:
        return (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
