"""Reading Meta's checkpoint layout: params.json and consolidated.NN.pth shards, one per
model-parallel rank, and placing a rank's tensors straight into its model."""

import dataclasses
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from llama.model import ModelArgs, Transformer

# How each weight is split across model-parallel ranks (the dimension), None = replicated.
# Column-parallel layers split their output features (rows), row-parallel ones their input
# features (columns), the embedding its embedding dimension.
_SHARD_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
    "wo": 1, "w2": 1,
}


def shard_dim(key: str) -> Optional[int]:
    """The dimension along which checkpoint tensor `key` is split over ranks (None: every rank
    holds all of it), e.g. "layers.0.attention.wq.weight" -> 0."""
    parts = key.split(".")
    return _SHARD_DIM.get(parts[-2]) if len(parts) >= 2 else None


def shard_of(key: str, tensor: torch.Tensor, rank: int, mp_size: int) -> torch.Tensor:
    """Rank `rank`'s part of the full (unsharded) checkpoint tensor `key`."""
    dim = shard_dim(key)
    if dim is None or mp_size == 1:
        return tensor
    return tensor.chunk(mp_size, dim=dim)[rank]


def read_params(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a checkpoint folder holds params.json, consolidated.NN.pth and "
            "tokenizer.model, as download.sh writes them"
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object of model hyper-parameters")
    return params


def model_args(params: dict, vocab_size: int, max_seq_len: int, max_batch_size: int, where: str) -> ModelArgs:
    """ModelArgs from params.json, checked; vocab_size comes from the tokenizer."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(params) - known)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown}")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ValueError(f"{where} lacks {key!r}; it does not describe a Llama model")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        value = params.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
        value = params.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    args = ModelArgs(**{k: v for k, v in params.items() if k in known and k != "vocab_size"})
    args.vocab_size, args.max_seq_len, args.max_batch_size = vocab_size, max_seq_len, max_batch_size
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
        raise ValueError(
            f"{where}: n_heads={args.n_heads} must divide dim={args.dim} and n_kv_heads={args.n_kv_heads} "
            "must divide n_heads"
        )
    return args


def shard_paths(ckpt_dir: Path) -> List[Path]:
    if not ckpt_dir.is_dir():
        hint = " (it is a file; pass the folder that holds it)" if ckpt_dir.exists() else ""
        raise FileNotFoundError(f"checkpoint folder not found: {str(ckpt_dir)!r}{hint}")
    paths = sorted(ckpt_dir.glob("*.pth"))
    if not paths:
        raise FileNotFoundError(
            f"no checkpoint files (consolidated.NN.pth) in {str(ckpt_dir)!r}: pass --ckpt_dir the folder "
            "that download.sh made, for example CodeLlama-7b/"
        )
    return paths


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """A shard's tensors, memory-mapped where the file format allows (nothing is read until used)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"could not read checkpoint {str(path)!r}: {e}. The file is incomplete or corrupt "
            "(an interrupted download, or an HTML error page saved in its place); download it again "
            "(download.sh resumes and checks md5 sums)."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


def load_model(
    ckpt_dir: str,
    vocab_size: int,
    max_seq_len: int,
    max_batch_size: int,
    mp_rank: int,
    mp_size: int,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = True,
) -> Transformer:
    """Build the Transformer for model-parallel rank `mp_rank` of `mp_size` on `device`, in `dtype`,
    with its weights read from the rank's shard of the checkpoint in `ckpt_dir`."""
    folder = Path(ckpt_dir)
    paths = shard_paths(folder)
    args = model_args(read_params(folder), vocab_size, max_seq_len, max_batch_size, str(folder / "params.json"))
    if len(paths) != mp_size:
        raise ValueError(
            f"{str(folder)!r} holds a checkpoint for {len(paths)} model-parallel process(es) "
            f"({', '.join(p.name for p in paths)}) but this run has {mp_size}: start it with "
            f"torchrun --nproc_per_node {len(paths)}"
        )
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "vocabulary size": vocab_size,
             "FFN width": args.ffn_hidden_dim}
    for name, value in sizes.items():
        if value % mp_size:
            raise ValueError(f"{name} {value} cannot be split evenly over {mp_size} model-parallel processes")

    with torch.device("meta"):
        model = Transformer(args)
    path = paths[mp_rank]
    state = load_shard(path)
    expected = {k: p.shape for k, p in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks {len(missing)} weight(s), e.g. {missing[:3]}: the file is not a Llama "
            "checkpoint, or params.json belongs to another model"
        )
    loaded = {}
    for key in tqdm(expected, desc=f"loading {path.name}", unit="tensor", disable=None if show_progress else True):
        tensor = state[key]
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(_shape_error(key, tuple(tensor.shape), tuple(expected[key]), vocab_size, folder))
        loaded[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(loaded, assign=True, strict=True)
    model.requires_grad_(False)
    return model


def _shape_error(key: str, got: tuple, want: tuple, vocab_size: int, folder: Path) -> str:
    if key in ("tok_embeddings.weight", "output.weight") and got[0] != want[0]:
        return (
            f"the checkpoint's vocabulary has {got[0]} tokens but the tokenizer has {vocab_size}: pass the "
            f"tokenizer.model that came with this checkpoint ({str(folder / 'tokenizer.model')!r})"
        )
    return (
        f"checkpoint tensor {key} has shape {got} but params.json describes {want}: params.json and the "
        "shards do not belong to the same model"
    )
