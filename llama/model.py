"""The Llama-2 / Code Llama Transformer: its math, its KV cache and the attention plan.

Only math lives here: no devices are chosen, no files are read, no process groups are made, no
rank is asked for. The projections are llama.parallel's column- and row-parallel layers (the
checkpoints' sharding contract). Parameter names are exactly the keys of Meta's checkpoints.

Shapes in comments: B batch, T new tokens, S cached positions attended, H heads, D head dim.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from llama import layer_step
from llama.attention import FEW_TOKENS, attend
from llama.parallel import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, SharedInput, world_size


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention when smaller than n_heads
    vocab_size: int = -1  # set from the tokenizer
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Code Llama's params.json says 1e6

    max_batch_size: int = 32  # runtime limits: the KV cache never grows past them
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32, then cast back before the weight, as the reference does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for `positions` (any shape) -> (*positions.shape, head_dim // 2).

    Angles are computed in float64 (float32 where the device has no float64, such as MPS) and
    returned in float32, so positions near 100k keep their precision."""
    device = positions.device
    dt = torch.float32 if device.type == "mps" else torch.float64
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dt) / head_dim))
    angles = positions.to(dt)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) in float32, as Meta's layout expects.

    cos, sin: (B or 1, T, D // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of one batch, one (B, H_kv, S, D) tensor per layer, laid out for attention.

    It starts empty and grows (contents kept) to what a call asks for, never past the model's
    max_batch_size x max_seq_len. Lengths are rounded up (to a multiple of 256, or to a power of
    two for a compiled decode step, which compiles once per shape) so that a growing sequence
    rarely reallocates."""

    ROUND = 256

    def __init__(self, args: ModelArgs, n_local_kv_heads: int, dtype: torch.dtype, device: torch.device,
                 pow2: bool = False):
        self.args, self.pow2 = args, pow2
        empty = torch.zeros((0, n_local_kv_heads, 0, args.head_dim), dtype=dtype, device=device)
        self.k = [empty] * args.n_layers
        self.v = [empty] * args.n_layers

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[2]

    def keep_rows(self, rows: List[int]) -> None:
        """Move cache rows `rows` (in this order) to the front: rows [0, len(rows)) hold them after."""
        if rows == list(range(len(rows))):
            return
        index = torch.tensor(rows, device=self.k[0].device)
        for t in self.k + self.v:
            t[: len(rows)] = t[index]

    def planned_shape(self, batch_size: int, seq_len: int) -> Tuple[int, int]:
        """(rows, positions) the cache will have after reserve(batch_size, seq_len)."""
        if batch_size <= self.batch_size and seq_len <= self.seq_len:
            return self.batch_size, self.seq_len
        if self.pow2:
            rounded = max(self.ROUND, 1 << (seq_len - 1).bit_length())
        else:
            rounded = -(-seq_len // self.ROUND) * self.ROUND
        return max(self.batch_size, batch_size), max(self.seq_len, min(rounded, self.args.max_seq_len))

    def nbytes(self, batch_size: int, seq_len: int) -> int:
        """Bytes of keys and values for `batch_size` rows of `seq_len` positions."""
        t = self.k[0]
        return 2 * len(self.k) * batch_size * t.shape[1] * seq_len * t.shape[3] * t.element_size()

    def reserve(self, batch_size: int, seq_len: int) -> None:
        """Make room for `batch_size` rows of `seq_len` positions, keeping what is cached."""
        new_b, new_s = self.planned_shape(batch_size, seq_len)
        if (new_b, new_s) == (self.batch_size, self.seq_len):
            return

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros((new_b, old.shape[1], new_s, old.shape[3]))
            new[: old.shape[0], :, : old.shape[2]] = old
            return new

        self.k = [grown(t) for t in self.k]
        self.v = [grown(t) for t in self.v]


@dataclass
class AttentionPlan:
    """Where a forward pass writes keys/values and which cached positions each query may see.

    Built once per forward and shared by all layers."""

    rows: slice  # the cache rows of the batch's rows
    start: Optional[int]  # every row writes positions start..start+T-1 (None: see `positions`)
    positions: Optional[torch.Tensor]  # (B, T) per-row write positions: pos[b] + t
    kv_len: int  # queries attend to cache positions [0, kv_len)
    mask: Union[None, torch.Tensor, CausalBias]  # bool, broadcastable to (B, 1, T, kv_len): True = may attend
    is_causal: bool  # plain causal mask, used when keys are exactly the T new tokens
    last: Optional[torch.Tensor] = None  # (B, T) int64: the last position each query sees (a few tokens only)


def attention_plan(
    start_pos: Union[int, torch.Tensor], seqlen: int, rows: slice, device: torch.device,
    kv_len: Optional[int] = None,
) -> AttentionPlan:
    """kv_len: with per-row positions, 1 + their largest write position (max(start_pos) + seqlen)
    if the caller knows it (saves a sync)."""
    plan = mask_plan(start_pos, seqlen, rows, device, kv_len)
    if seqlen <= FEW_TOKENS:  # query t of row b sees positions 0 .. its own, start_pos[b] + t
        bsz = rows.stop - rows.start
        plan.last = plan.positions if plan.positions is not None else torch.arange(
            plan.start, plan.start + seqlen, device=device).expand(bsz, seqlen)
    return plan


def mask_plan(
    start_pos: Union[int, torch.Tensor], seqlen: int, rows: slice, device: torch.device, kv_len: Optional[int],
) -> AttentionPlan:
    """The plan, its visibility said as a mask or is_causal (PyTorch's attention's terms)."""
    if isinstance(start_pos, int):
        kv_len = start_pos + seqlen
        if seqlen == 1:
            return AttentionPlan(rows, start_pos, None, kv_len, None, False)
        if start_pos == 0:
            return AttentionPlan(rows, 0, None, kv_len, None, True)
        # A chunk after cached positions: query t sees keys 0..start_pos+t. The lower-right causal
        # bias lets the flash / memory-efficient kernels apply it without a (T, kv_len) mask.
        return AttentionPlan(rows, start_pos, None, kv_len, causal_lower_right(seqlen, kv_len), False)
    # Per-row positions: row b's T tokens sit at pos[b]..pos[b]+T-1, and query t of row b sees key
    # j iff j <= pos[b] + t. The mask depends on positions only, never on what a row wrote before,
    # so whatever a longer earlier pass left past a row's position (rejected speculative tokens,
    # padding) is never read: it is overwritten before any query can reach it.
    positions = start_pos[:, None] + torch.arange(seqlen, device=device)  # (B, T)
    if kv_len is None:
        kv_len = int(start_pos.max()) + seqlen
    mask = torch.arange(kv_len, device=device) <= positions[:, :, None]  # (B, T, kv_len)
    return AttentionPlan(rows, None, positions, kv_len, mask[:, None], False)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_local_heads = args.n_heads // world_size()
        self.n_local_kv_heads = args.n_kv_heads // world_size()
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, gather_output=False)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, gather_output=False)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim)
        self.wqkv = SharedInput(self.wq, self.wk, self.wv)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(x)
        q = q.reshape(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = k.reshape(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.reshape(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D)

        if (plan.rows.start, plan.rows.stop) != (0, cache_k.shape[0]):
            cache_k, cache_v = cache_k[plan.rows], cache_v[plan.rows]  # (B, H_kv, S_cache, D)
        if plan.positions is None:
            cache_k[:, :, plan.start : plan.start + seqlen] = k
            cache_v[:, :, plan.start : plan.start + seqlen] = v
        else:
            batch = torch.arange(bsz, device=x.device)[:, None]
            cache_k[batch, :, plan.positions] = k.transpose(1, 2)  # (B, T, H_kv, D) at (b, positions[b, t])
            cache_v[batch, :, plan.positions] = v.transpose(1, 2)
        keys = cache_k[:, :, : plan.kv_len]  # (B, H_kv, S, D)
        values = cache_v[:, :, : plan.kv_len]

        out = attend(q, keys, values, plan.mask, plan.is_causal, plan.last)  # (B, T, H, D)
        return self.wo(out.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, gather_output=False)
        self.w2 = RowParallelLinear(hidden_dim, dim)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, gather_output=False)
        self.w13 = SharedInput(self.w1, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, cache_k, cache_v, plan: AttentionPlan) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache_k, cache_v, plan)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.layer_weights = layer_step.LayerWeights(self.layers, self.norm)  # as the native step takes them
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True)
        self.cache: Optional[KVCache] = None  # made on first use, on the weights' device

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (float32, on the model's device) for every position of `tokens` (B, T; on any
        device), which sit at positions start_pos..start_pos+T-1 after whatever this model's KV
        cache holds before start_pos."""
        if start_pos + tokens.shape[1] > self.params.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + tokens.shape[1]} exceed max_seq_len={self.params.max_seq_len}; "
                "build the model with a larger max_seq_len"
            )
        if tokens.shape[0] > self.params.max_batch_size:
            raise ValueError(
                f"batch of {tokens.shape[0]} exceeds max_batch_size={self.params.max_batch_size}"
            )
        self.reserve_cache(tokens.shape[0], start_pos + tokens.shape[1])
        return self.logits(self.hidden(tokens.to(self.device), start_pos))

    @property
    def device(self) -> torch.device:
        """Where the weights (and so the cache and every input) live."""
        return self.output.weight.device

    def new_cache(self, pow2: bool = False) -> KVCache:
        """An empty KV cache for this model (this rank's KV heads, the weights' dtype and device).
        pow2: lengths grow in powers of two (for a compiled step, which compiles once per shape)."""
        n_kv = self.layers[0].attention.n_local_kv_heads
        return KVCache(self.params, n_kv, self.output.weight.dtype, self.device, pow2=pow2)

    def use_cache(self, cache: KVCache) -> None:
        """Read and write keys and values in `cache` from now on."""
        self.cache = cache

    def reserve_cache(self, batch_size: int, seq_len: int) -> KVCache:
        """The model's cache, made if it has none, grown to `batch_size` rows of `seq_len` positions."""
        if self.cache is None:
            self.use_cache(self.new_cache())
        self.cache.reserve(batch_size, seq_len)
        return self.cache

    def hidden(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        kv_len: Optional[int] = None,
        rows: Optional[slice] = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, dim) of `tokens`, writing their keys and values
        into the cache, which must already have room (see `reserve_cache`).

        start_pos: an int shared by all rows, or a (B,) tensor of per-row positions of each row's
            first token (its T tokens follow it), then kv_len may give max(start_pos) + T.
        rows: the cache rows the batch's rows use (default: the first B)."""
        bsz, seqlen = tokens.shape
        rows = slice(0, bsz) if rows is None else rows
        plan = attention_plan(start_pos, seqlen, rows, tokens.device, kv_len)
        h = self.tok_embeddings(tokens)
        # a few tokens on the CPU: every layer's same math, and the final norm, in one native call, where it serves
        stepped = layer_step.step(self.layer_weights, h, self.params.rope_theta, self.cache.k, self.cache.v, plan)
        if stepped is not None:
            return stepped
        if plan.positions is None:
            positions = torch.arange(plan.start, plan.start + seqlen, device=tokens.device)[None]
        else:
            positions = plan.positions
        cos, sin = rotary_cos_sin(positions, self.params.head_dim, self.params.rope_theta)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, self.cache.k[i], self.cache.v[i], plan)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()
