"""The GGUF layout of Llama weights (llama.cpp's single-file format): tensor names and how they
map to Meta's, hyper-parameters from the file's metadata, and a reader of one rank's share.

llama.cpp's converters store the query and key rows in Meta's interleaved rotary order (they undo
Hugging Face's "rotate half" order when converting), so a GGUF's q/k rows need no reordering here.
GGUF lists a tensor's shape fastest dimension first; numpy views of its data are (rows, columns)
as in Meta's checkpoints.
"""

from pathlib import Path
from typing import List, Optional, Tuple

import gguf
import numpy as np
import torch

from llama.files import open_gguf, rename
from llama.hf import ffn_params
from llama.parallel import shard_bounds, shard_shape

# Meta name -> GGUF name; {i} is the layer index.
META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
}
GGUF_TO_META = {g: m for m, g in META_TO_GGUF.items()}


def gguf_name(meta_name: str) -> Optional[str]:
    """GGUF name of a Meta checkpoint key (None for keys GGUF has no use for, e.g. rope.freqs)."""
    return rename(meta_name, META_TO_GGUF)


def meta_name(gguf_name: str) -> Optional[str]:
    """Meta name of a GGUF tensor (None for tensors Meta's layout lacks, e.g. rope_freqs.weight)."""
    return rename(gguf_name, GGUF_TO_META)


# Reading the GGUF layout ---------------------------------------------------------------------

GGMLType = gguf.GGMLQuantizationType
# Stored tensor type -> the dtype its values are read in: float types as they are, quantized
# blocks dequantized (by gguf.quants) to float32.
VALUE_DTYPES = {
    GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16,
    **{GGMLType[name]: torch.float32 for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                                                  "Q5_K", "Q6_K")},
}
REQUIRED_FIELDS = ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                   "llama.feed_forward_length")
UNUSED_TENSORS = {  # GGUF tensors with no place in Meta's Llama, and why they cannot be ignored
    "rope_freqs.weight": "rotary frequency factors (Llama 3.1's rope scaling), which this model does not apply",
}


def read_params(file: gguf.GGUFReader, path: Path) -> dict:
    """Meta's params.json for the model a GGUF file's metadata describes (as hf.read_config does
    for a config.json); the vocabulary size comes from the tokenizer."""
    def field(key: str, default=None):
        return file.fields[key].contents() if key in file.fields else default

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{str(path)!r} holds a {arch!r} model (general.architecture); only Llama models (architecture "
            "'llama', such as Code Llama's GGUF files) are supported"
        )
    if field("llama.expert_count", 0):
        raise ValueError(f"{str(path)!r} holds a mixture of experts ({field('llama.expert_count')} experts); "
                         "only dense Llama models are supported")
    scaling = field("llama.rope.scaling.type", "linear" if "llama.rope.scale_linear" in file.fields else "none")
    if scaling != "none" and field("llama.rope.scaling.factor", field("llama.rope.scale_linear", 1.0)) != 1.0:
        raise ValueError(f"{str(path)!r}: rotary scaling {scaling!r} is not supported")
    missing = [key for key in REQUIRED_FIELDS if key not in file.fields]
    if missing:
        raise ValueError(f"{str(path)!r}'s metadata lacks {', '.join(missing)}: the file is not a complete Llama "
                         "GGUF; download it again")
    dim, n_heads = field("llama.embedding_length"), field("llama.attention.head_count")
    n_kv_heads = field("llama.attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv_heads, list):
        raise ValueError(f"{str(path)!r}: per-layer head counts are not supported")
    rotary = field("llama.rope.dimension_count", dim // n_heads)
    if rotary != dim // n_heads:
        raise ValueError(f"{str(path)!r}: rotary embeddings over {rotary} of each head's {dim // n_heads} "
                         "dimensions are not supported")
    multiple_of, multiplier = ffn_params(dim, field("llama.feed_forward_length"))
    return {
        "dim": dim,
        "n_layers": field("llama.block_count"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": field("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": field("llama.rope.freq_base", 10000.0),
    }


# Types whose every 32 consecutive values of a row lie on a 4-bit grid of their own, value = scale *
# code + low with code in 0..15: what the int4 scheme holds in groups of 32 (llama.quantization).
GRID_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
GRID_COLUMNS = 32


def four_bit_grids(raw: np.ndarray, qtype: GGMLType) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (R, K) in 0..15, scale and low float32 (R, K / 32)) of GGUF rows `raw` (R, bytes
    of whole blocks) of a type in GRID_TYPES: each value is scale * code + low of its group of 32.
    ggml's blocks (as gguf.quants reads them): Q4_0, 32 values: float16 d, 16 bytes of codes, value
    d * (code - 8); Q4_1: d, m, 16 bytes, d * code + m; in both the low halves of the bytes are the
    first 16 values, the high halves the next 16. Q4_K, 256 values: float16 d and dmin, 12 bytes of
    6-bit scales and mins (8 each), 128 bytes of codes, groups of 32 alternating between the low and
    high halves of each 32 bytes; value d * scale_i * code - dmin * min_i."""
    rows = raw.shape[0]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)

    def halves(codes: np.ndarray) -> np.ndarray:  # (B, n, 16 or 32) bytes -> (B, n, 2, ..) codes, low half first
        return np.stack([codes & 0x0F, codes >> 4], axis=2)

    def f16(lo: int) -> np.ndarray:
        return blocks[:, lo:lo + 2].view(np.float16).astype(np.float32)

    if qtype == GGMLType.Q4_K:
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        codes = halves(blocks[:, 16:].reshape(len(blocks), 4, 32))
        scale, low = f16(0) * sc.astype(np.float32), -f16(2) * mn.astype(np.float32)
    elif qtype == GGMLType.Q4_1:
        codes, scale, low = halves(blocks[:, 4:][:, None]), f16(0), f16(2)
    else:
        codes, scale = halves(blocks[:, 2:][:, None]), f16(0)
        low = -8 * scale
    per_row = raw.shape[1] // size * block // GRID_COLUMNS  # groups a row
    return (torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(scale.reshape(rows, per_row)),
            torch.from_numpy(low.reshape(rows, per_row)))


def float_values(raw: np.ndarray, qtype: GGMLType) -> torch.Tensor:
    """The values of GGUF tensor bytes (whole blocks of each row; rows first), in a new tensor."""
    if qtype == GGMLType.F32:
        return torch.from_numpy(np.array(raw.view(np.float32)))
    if qtype == GGMLType.F16:
        return torch.from_numpy(np.array(raw.view(np.float16)))
    if qtype == GGMLType.BF16:
        return torch.from_numpy(np.array(raw.view(np.int16))).view(torch.bfloat16)
    return torch.from_numpy(gguf.quants.dequantize(np.ascontiguousarray(raw), qtype))


class GGUFWeightReader:
    """Model-parallel rank `rank` of `mp_size`'s view of a GGUF file, in Meta's names and shapes
    (loading.WeightReader). The file is memory-mapped; each tensor is sliced for the rank before
    its blocks are dequantized where the blocks allow (rows always, columns on block boundaries).
    Without output.weight, the output layer is the input embedding (tied), split by rows."""

    def __init__(self, path: Path, rank: int, mp_size: int):
        self.path, self.rank, self.mp_size = path, rank, mp_size
        self.file = open_gguf(path)
        if self.file.byte_order != "I":
            raise ValueError(f"{str(path)!r} is a big-endian GGUF file; only little-endian ones are supported")
        self.tensors = {meta_name(t.name): t for t in self.file.tensors if meta_name(t.name) is not None}
        unknown = [t.name for t in self.file.tensors if meta_name(t.name) is None]
        if unknown:
            why = UNUSED_TENSORS.get(unknown[0], "not part of a Llama model")
            raise ValueError(f"{str(path)!r} holds {len(unknown)} tensor(s) that cannot be loaded, e.g. "
                             f"{unknown[0]} ({why})")
        # The projections stored on 4-bit grids: int4 in groups of theirs keeps them as they are.
        self.grid_keys = frozenset(k for k, t in self.tensors.items() if k.startswith("layers.")
                                   and len(t.shape) == 2 and t.tensor_type in GRID_TYPES)
        self.tied = "output.weight" not in self.tensors and "tok_embeddings.weight" in self.tensors
        if self.tied:
            self.tensors["output.weight"] = self.tensors["tok_embeddings.weight"]

    def params(self) -> dict:
        """Meta's params.json for the model the file's metadata describes."""
        return read_params(self.file, self.path)

    def describe(self) -> str:
        return self.path.name

    def keys(self) -> List[str]:
        return list(self.tensors)

    def _full_shape(self, key: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[key].shape))

    def vocab_rows(self) -> int:
        return self._full_shape("tok_embeddings.weight")[0]

    def shape(self, key: str) -> Tuple[int, ...]:
        return shard_shape(key, self._full_shape(key), self.mp_size)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `key`'s values have once read: float32 for quantized blocks."""
        qtype = self.tensors[key].tensor_type
        if qtype not in VALUE_DTYPES:
            raise ValueError(
                f"GGUF tensor {self.tensors[key].name} in {str(self.path)!r} is stored as {qtype.name}, which "
                f"cannot be read; supported types: {', '.join(q.name for q in VALUE_DTYPES)}. Use a GGUF file "
                "quantized to one of them (e.g. Q4_K_M, Q8_0)"
            )
        return VALUE_DTYPES[qtype]

    def read(self, key: str, dtype: Optional[torch.dtype] = None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        tensor, stored = self.tensors[key], self.dtype(key)
        dim, lo, hi = shard_bounds(key, self._full_shape(key), self.rank, self.mp_size)
        block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        raw = tensor.data.view(np.uint8)  # (rows, bytes of each row), memory-mapped
        columns = slice(None)
        if dim == 0:
            raw = raw[lo:hi]
        elif dim == 1 and lo % block == 0 and hi % block == 0:
            raw = raw[:, lo // block * size:hi // block * size]
        elif dim == 1:  # the rank's columns cut through blocks: dequantize whole rows, then slice
            columns = slice(lo, hi)
        values = float_values(raw, tensor.tensor_type)[..., columns]
        return values.to(device=device, dtype=dtype or stored).contiguous()

    def grids(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's part of `key` as the 4-bit grids of 32 columns it is stored in (codes, scale,
        low: four_bit_grids), or None where it is not stored so (a type outside GRID_TYPES, or a
        rank's columns that cut through a group)."""
        tensor = self.tensors[key]
        dim, lo, hi = shard_bounds(key, self._full_shape(key), self.rank, self.mp_size)
        if tensor.tensor_type not in GRID_TYPES or (dim == 1 and (lo % GRID_COLUMNS or hi % GRID_COLUMNS)):
            return None
        raw = tensor.data.view(np.uint8)
        codes, scale, low = four_bit_grids(raw[lo:hi] if dim == 0 else raw, tensor.tensor_type)
        if dim == 1:  # whole rows unpacked (a Q4_K block spans 256 columns), then the rank's columns
            g = slice(lo // GRID_COLUMNS, hi // GRID_COLUMNS)
            codes, scale, low = codes[:, lo:hi].contiguous(), scale[:, g].contiguous(), low[:, g].contiguous()
        return codes, scale, low
