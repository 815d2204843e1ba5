"""Model parallelism: fairscale's column- and row-parallel layers, the collectives they call, and
how each checkpoint tensor is split over the model-parallel ranks.

The Transformer in llama.model is built from these layers; it never asks which rank it is on.
"""

from typing import Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama.kernels import QuantizedWeight, join, linear


def world_size() -> int:
    """How many model-parallel ranks share the model."""
    return fs_init.get_model_parallel_world_size()


def all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum x (or reduce it with `op`, e.g. MAX) over the model-parallel group, in place."""
    group = fs_init.get_model_parallel_group()
    if dist.get_world_size(group=group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every model-parallel rank's x along the last dimension, in rank order."""
    group = fs_init.get_model_parallel_group()
    world = dist.get_world_size(group=group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


# fairscale's parallel layers allocate and initialise full weights in __init__ with the legacy
# `torch.Tensor(...)` constructor, which ignores `with torch.device("meta")`. These subclasses keep
# fairscale's weight layout (the checkpoints' sharding contract) but only declare the local shard,
# so the model can be built on the meta device and the checkpoint's tensors assigned in place:
# nothing is allocated twice. Their forward calls the collectives above directly: fairscale's
# autograd wrappers serve training, and torch.compile cannot trace them. Their weight may be
# replaced by a kernels.QuantizedWeight (see `set_weight`); `linear` applies either.


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """y = x W^T with W split by rows (output features) over the model-parallel ranks."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.output_size_per_partition = out_features // world_size()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return all_gather_last_dim(y) if self.gather_output else y


class RowParallelLinear(fs_layers.RowParallelLinear):
    """y = x W^T with W split by columns (input features); partial results are all-reduced."""

    def __init__(self, in_features: int, out_features: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = True
        self.input_size_per_partition = in_features // world_size()
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(linear(x, self.weight))


class SharedInput(nn.Module):
    """Column-parallel layers (gather_output=False) that read the same input, as a block's wq, wk
    and wv, or w1 and w3: applied as one product once `join` finds their weights laid out one
    after another (huge_pages.move_weights lays them so), else one product each. The answers are
    the same; one product of 1536 rows reads its weights faster than three of 1024, 256 and 256,
    and a decoding step makes 36 calls fewer on a 12-layer model. The layers stay registered where
    they are (and so in the state dict); a joined float weight is a buffer outside the state dict,
    so that `model.to(dtype)` converts it with them. Whoever replaces a layer's weight otherwise
    joins again (a joined weight is views of the old ones)."""

    def __init__(self, *layers: ColumnParallelLinear):
        super().__init__()
        assert not any(layer.gather_output for layer in layers)
        self.layers = tuple(layers)  # a tuple: not registered as this module's children
        self.sizes = [layer.output_size_per_partition for layer in layers]
        self.register_buffer("joined_float", None, persistent=False)
        self.joined_quantized: Optional[QuantizedWeight] = None

    def join(self) -> bool:
        """Apply the layers as one product from now on, where their weights allow; whether they do."""
        joined = join([layer.weight for layer in self.layers])
        self.joined_float = joined if isinstance(joined, torch.Tensor) else None
        self.joined_quantized = joined if isinstance(joined, QuantizedWeight) else None
        return joined is not None

    def joined(self) -> Union[torch.Tensor, QuantizedWeight, None]:
        """The layers' weights as one (stacked by rows), or None where they are applied apart."""
        return self.joined_float if self.joined_float is not None else self.joined_quantized

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        joined = self.joined()
        if joined is None:
            return tuple(layer(x) for layer in self.layers)
        return linear(x, joined).split(self.sizes, dim=-1)


def shared_inputs(model: nn.Module):
    """Every SharedInput among the model's modules."""
    return [module for module in model.modules() if isinstance(module, SharedInput)]


def join_shared_inputs(model: nn.Module) -> None:
    """(Re)join every SharedInput of the model: after its weights are laid out, or replaced."""
    for group in shared_inputs(model):
        group.join()


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """Embedding split along the embedding dimension; the slices are all-gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse, self._weight = False, False, None
        self.embedding_dim_per_partition = embedding_dim // world_size()
        self.weight = nn.Parameter(torch.empty(num_embeddings, self.embedding_dim_per_partition))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, self.weight))


def set_weight(layer: nn.Module, weight: QuantizedWeight) -> None:
    """Make a column- or row-parallel layer apply `weight` in place of its float weight Parameter,
    which is dropped (and so leaves the layer's parameters and state dict)."""
    del layer.weight
    layer.weight = weight


# How each checkpoint tensor is split over model-parallel ranks (the dimension), None = replicated:
# column-parallel layers split their output features (rows), row-parallel ones their input
# features (columns), the embedding its embedding dimension. A quantized weight's scales (and
# zeros) follow its weight: per group (2-D: rows x groups) they split as the weight does; per row
# (1-D) they split with a column-parallel layer's rows and are whole on every rank of a
# row-parallel layer, whose ranks all hold every row.
SHARD_DIMS = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def shard_dim(key: str, ndim: int = 2) -> Optional[int]:
    """The dimension along which checkpoint tensor `key`, of `ndim` dimensions, is split over ranks
    (None: every rank holds all of it), e.g. "layers.0.attention.wq.weight" -> 0, and the 1-D
    "layers.0.attention.wo.scale" -> None."""
    parts = key.split(".")
    dim = SHARD_DIMS.get(parts[-2]) if len(parts) >= 2 else None
    return dim if dim is not None and dim < ndim else None


def shard_bounds(key: str, full_shape: Tuple[int, ...], rank: int, mp_size: int) -> Tuple[Optional[int], int, int]:
    """(dim, start, end): rank `rank`'s part of checkpoint tensor `key`, whose full shape is
    `full_shape`, is [start, end) along dim (dim None: the whole tensor)."""
    dim = shard_dim(key, len(full_shape))
    if dim is None:
        return None, 0, 0
    n = full_shape[dim] // mp_size
    return dim, rank * n, (rank + 1) * n


def shard_shape(key: str, full_shape: Tuple[int, ...], mp_size: int) -> Tuple[int, ...]:
    """The shape of each rank's part of checkpoint tensor `key`, whose full shape is `full_shape`."""
    dim = shard_dim(key, len(full_shape))
    if dim is None:
        return tuple(full_shape)
    return tuple(full_shape[:dim]) + (full_shape[dim] // mp_size,) + tuple(full_shape[dim + 1:])


def shard_of(key: str, tensor: torch.Tensor, rank: int, mp_size: int) -> torch.Tensor:
    """Rank `rank`'s part of the full (unsharded) checkpoint tensor `key`."""
    dim = shard_dim(key, tensor.dim())
    if dim is None or mp_size == 1:
        return tensor
    return tensor.chunk(mp_size, dim=dim)[rank]
