"""Writing a checkpoint as one GGUF file, the single-file format llama.cpp runs: the hyper-parameters
and the sentencepiece vocabulary as metadata, every weight under its GGUF name in f32, f16, bf16 or
q8_0.

What is written follows llama.cpp's own converters for a Llama (convert_hf_to_gguf.py, and
convert_legacy_llama.py, which read Meta's layout): the same keys, norms kept in f32, q8_0 rows
that 32-value blocks do not tile stored as f16, the vocabulary padded with [PADn] pieces up to the
embedding's rows. The query and key rows are written in Meta's interleaved rotary order, as they
are read here: llama.cpp's converters permute Hugging Face's "rotate half" rows back to that order,
and its Llama graph rotates adjacent pairs.

Tensors are read, converted and written one at a time (header, metadata and tensor table first,
then the data), so memory use peaks at about one tensor.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from llama.gguf import META_TO_GGUF, gguf_name
from llama.loading import WeightReader, model_args, open_checkpoint, resolve_checkpoint
from llama.quantization import refuse_quantized
from llama.model import ModelArgs
from llama.tokenizer import EOT_PIECE

# --type -> (the type of the weight matrices, the file type GGUF records)
FILE_TYPES: Dict[str, Tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
TORCH_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
PAD_SCORE = -1000.0  # llama.cpp's converter gives the [PADn] pieces past the tokenizer's last this score
UNUSED = int(gguf.TokenType.UNUSED)


@dataclass
class Vocabulary:
    """A sentencepiece tokenizer as GGUF stores it (llama.cpp's "llama" tokenizer model)."""

    tokens: List[str]
    scores: List[float]
    types: List[int]  # sentencepiece's piece types, numbered as llama.cpp's token types (NORMAL 1 ... BYTE 6)
    special: Dict[str, int]  # GGUF key -> id: bos, eos, unknown, padding if any, Code Llama's <EOT>


def read_vocabulary(path: Path, n_vocab: int) -> Vocabulary:
    """The sentencepiece model at `path` as `n_vocab` GGUF tokens, as llama.cpp's converter writes
    it: the pieces with their scores and types, then [PADn] pieces up to n_vocab (the embedding's
    rows). Code Llama's ▁<EOT> is named as the end-of-turn token (llama.cpp finds ▁<PRE>, ▁<SUF>
    and ▁<MID> by their text)."""
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        proto.Clear()
    if not proto.pieces:
        raise ValueError(f"{str(path)!r} is not a sentencepiece model; put the checkpoint's tokenizer.model there")
    pieces = list(proto.pieces)
    if len(pieces) > n_vocab:
        raise ValueError(
            f"{str(path)!r} has {len(pieces)} pieces but the model's embedding only {n_vocab} rows: the "
            "tokenizer belongs to another model; put the checkpoint's own tokenizer.model there"
        )
    pad = range(len(pieces), n_vocab)
    spec = proto.trainer_spec
    keys = gguf.Keys.Tokenizer
    special = {keys.BOS_ID: spec.bos_id, keys.EOS_ID: spec.eos_id, keys.UNK_ID: spec.unk_id, keys.PAD_ID: spec.pad_id}
    special[keys.EOT_ID] = next((i for i, p in enumerate(pieces) if p.piece == EOT_PIECE), -1)
    return Vocabulary(
        tokens=[p.piece for p in pieces] + [f"[PAD{i}]" for i in pad],
        scores=[p.score for p in pieces] + [PAD_SCORE] * len(pad),
        types=[int(p.type) for p in pieces] + [UNUSED] * len(pad),
        special={key: i for key, i in special.items() if i >= 0},  # -1: the tokenizer has none
    )


def tensor_type(shape: Sequence[int], weights: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type GGUF stores a tensor of `shape` (rows, columns) in when the weights are `weights`:
    1-D tensors (the norms) in f32, which is what llama.cpp reads them as; matrices whose rows the
    quantization's blocks do not tile in f16, as llama.cpp's converter falls back to."""
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[weights]
    return weights if shape[-1] % block == 0 else GGMLQuantizationType.F16


def stored_bytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes a tensor of `shape` takes in the file as `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes GGUF stores for `tensor` (rows, columns) as `qtype`, row after row."""
    if qtype in TORCH_DTYPES:
        return tensor.to(TORCH_DTYPES[qtype]).contiguous().view(-1).view(torch.uint8).numpy()
    return gguf.quants.quantize(tensor.float().numpy(), qtype)


def llama_keys(n_layers: int) -> List[str]:
    """The Meta names of the tensors a GGUF Llama of `n_layers` layers holds."""
    keys = []
    for pattern in META_TO_GGUF:
        keys += [pattern.format(i=i) for i in range(n_layers)] if "{i}" in pattern else [pattern]
    return keys


def checked_keys(reader: WeightReader, args: ModelArgs, src: str) -> List[str]:
    """The checkpoint's tensors to write, in its order; raise unless they are exactly a Llama's of
    args.n_layers layers (llama.cpp refuses a file with a tensor missing or one too many)."""
    keys = [k for k in reader.keys() if gguf_name(k) is not None]  # e.g. rope.freqs has no use there
    want = llama_keys(args.n_layers)
    missing, extra = sorted(set(want) - set(keys)), sorted(set(keys) - set(want))
    if missing or extra:
        raise ValueError(
            f"{reader.describe()} in {src!r} do(es) not hold the tensors of the {args.n_layers}-layer Llama its "
            f"hyper-parameters describe (missing: {missing[:3]}, unexpected: {extra[:3]}): the files are incomplete, "
            "or params.json belongs to another model"
        )
    return keys


def add_metadata(writer: gguf.GGUFWriter, args: ModelArgs, name: str, file_type: LlamaFileType, vocab: Vocabulary) -> None:
    """The keys llama.cpp's converter writes for a Llama with a sentencepiece tokenizer."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    # Code Llama (rope_theta 1e6) was trained on 16k-token sequences, Llama 2 on 4k.
    writer.add_context_length(16384 if args.rope_theta >= 1e6 else 4096)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.norm_eps))
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for key, i in vocab.special.items():
        writer.add_uint32(key, i)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)


def refuse_output_file(path: Path) -> None:
    """Raise if `path` exists: an export never overwrites a file."""
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder; pass the name of the .gguf file to write, e.g. {path / 'model.gguf'}")
    if path.exists():
        raise FileExistsError(f"{path} already exists; pass a new file name or delete it first")


def write_gguf(src: str, dst: str, type: str = "f32", show_progress: bool = True) -> Path:
    """Write the checkpoint in `src` (Meta's layout with any number of shards, or Hugging Face's,
    with its tokenizer.model) as the single GGUF file `dst`, which must not exist, with its weight
    matrices in `type` (f32, f16, bf16 or q8_0); returns dst."""
    if type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; use one of {', '.join(FILE_TYPES)}")
    weights, file_type = FILE_TYPES[type]
    src = resolve_checkpoint(src)
    src_dir, path = Path(src), Path(dst)
    if src_dir.suffix == ".gguf":
        raise ValueError(f"{src} is a GGUF file already; llama.cpp's llama-quantize converts it to another type")
    params, reader = open_checkpoint(src, 0, 1)
    refuse_quantized(params, str(src_dir / "params.json"), "writing a GGUF file")
    refuse_output_file(path)
    tokenizer = src_dir / "tokenizer.model"
    if not tokenizer.is_file():
        raise FileNotFoundError(
            f"{str(src_dir)!r} has no tokenizer.model, and a GGUF file must carry its vocabulary (llama.cpp "
            "loads none without): copy the checkpoint's tokenizer.model into it (e.g. from CodeLlama-7b/)"
        )
    args = model_args(params, reader.vocab_rows(), 16384, 1, str(src_dir))
    keys = checked_keys(reader, args, src)
    vocab = read_vocabulary(tokenizer, args.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")  # renamed once complete: no half-written dst
    writer = gguf.GGUFWriter(part, arch="llama")
    try:
        add_metadata(writer, args, src_dir.resolve().name, file_type, vocab)
        types = {}
        for key in keys:
            shape = reader.shape(key)
            types[key] = tensor_type(shape, weights)
            writer.add_tensor_info(gguf_name(key), shape, np.dtype(np.float32), stored_bytes(shape, types[key]),
                                   raw_dtype=types[key])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key in tqdm(keys, unit="tensor", desc=f"{reader.describe()} -> {path.name}",
                        disable=None if show_progress else True):
            writer.write_tensor_data(encode(reader.read(key), types[key]))
        writer.close()
        part.rename(path)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return path
