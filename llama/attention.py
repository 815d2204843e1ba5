"""`attend`: the one place the model's attention over the KV cache is computed, and the kernel that
computes it.

A few new tokens on the CPU (decoding, a speculative verify pass) go to the project's own kernel
(llama/attention.c through llama/native.py), which reads each cached key and value once for all the
query heads that share it; everything else (prompts, GPUs) to PyTorch's
`scaled_dot_product_attention`. Both compute softmax(q K^T / sqrt(D)) V with the same visibility:
query t of row b sees cache positions 0 .. last[b, t].
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from llama import native

FEW_TOKENS = native.MAX_ROWS  # new tokens a forward up to which the project's kernel may serve (`last` is made)


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: Union[None, torch.Tensor, CausalBias],
    is_causal: bool,
    last: Optional[torch.Tensor],
) -> torch.Tensor:
    """Attention of q (B, T, H, D) over keys and values (B, H_kv, S, D; H a multiple of H_kv,
    head h reading KV head h // (H / H_kv)): (B, T, H, D) in q's dtype.

    The visibility, said twice: for PyTorch's kernel `mask` (bool, broadcastable to (B, 1, T, S),
    True = may attend, or a causal bias) or `is_causal`; for the project's kernel `last` (B, T)
    int64, the last position each query sees (None where it does not serve)."""
    if last is not None and native.attention_takes(q, keys, values):
        return native.attend(q, keys, values, last)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=is_causal,
        enable_gqa=q.shape[2] != keys.shape[1],
    )  # (B, H, T, D)
    return out.transpose(1, 2)
