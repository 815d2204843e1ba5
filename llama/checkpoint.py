"""Reading Meta's checkpoint layout: params.json and consolidated.NN.pth shards, and placing a
rank's share straight into its model.

A checkpoint of K shards runs on M model-parallel ranks for any K and M that split the model
evenly: rank r's slice of a weight is cut from the (memory-mapped) shards that overlap it, so a
rank reads only what it needs and nothing is allocated twice."""

import dataclasses
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from llama.model import ModelArgs, Transformer, shard_dim

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
    """The consolidated.NN.pth shards of an existing checkpoint folder, in rank order."""
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


def split_sizes(args: ModelArgs) -> Dict[str, int]:
    """The sizes model parallelism splits: each must be a multiple of the degree."""
    return {
        "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "dim": args.dim,
        "vocabulary size": args.vocab_size, "FFN width": args.ffn_hidden_dim,
    }


def check_degree(args: ModelArgs, mp_size: int) -> None:
    """Raise, naming the degrees that would work, unless `mp_size` splits the model evenly."""
    sizes = split_sizes(args)
    bad = [f"{name} {value}" for name, value in sizes.items() if value % mp_size]
    if bad:
        works = [d for d in range(1, min(sizes.values()) + 1) if all(v % d == 0 for v in sizes.values())]
        raise ValueError(
            f"this model cannot be split over {mp_size} model-parallel processes ({', '.join(bad)} "
            f"not divisible by {mp_size}); degrees that work: {', '.join(map(str, works))}"
        )


class ShardReader:
    """Model-parallel rank `rank` of `mp_size`'s view of a checkpoint stored as len(paths) shards.

    Only the shards that overlap the rank's share are opened, memory-mapped. Pages of a mapping
    that have been read stay resident until it is closed, so after copying `REMAP_BYTES` out of
    them the shards are closed (and reopened on the next read): host memory stays near the rank's
    share whatever the model's size."""

    REMAP_BYTES = 1 << 30

    def __init__(self, paths: List[Path], rank: int, mp_size: int):
        self.paths, self.rank, self.mp_size = paths, rank, mp_size
        k = len(paths)
        # Shards overlapping the fraction [rank / mp_size, (rank + 1) / mp_size) of a split weight.
        self.needed = range(rank * k // mp_size, -(-(rank + 1) * k // mp_size))
        self._shards: Dict[int, Dict[str, torch.Tensor]] = {}
        self._copied = 0  # bytes copied out of the open mappings

    def _shard(self, i: int) -> Dict[str, torch.Tensor]:
        if i not in self._shards:
            self._shards[i] = load_shard(self.paths[i])
        return self._shards[i]

    def describe(self) -> str:
        return ", ".join(self.paths[i].name for i in self.needed)

    def keys(self) -> List[str]:
        return list(self._shard(self.needed[0]))

    def vocab_rows(self) -> int:
        """The vocabulary size of the checkpoint (the embedding is split by columns: every shard
        has all its rows)."""
        return self._shard(self.needed[0])["tok_embeddings.weight"].shape[0]

    def _pieces(self, key: str) -> Tuple[Optional[int], List[torch.Tensor]]:
        """(split dim, [slices of shard tensors that make up this rank's part, in order])."""
        first = self._shard(self.needed[0])
        if key not in first:
            raise KeyError(key)
        dim = shard_dim(key)
        if dim is None:
            return None, [first[key]]
        k = len(self.paths)
        per_shard = first[key].shape[dim]
        full = per_shard * k
        if full % self.mp_size:
            raise ValueError(f"{key}: {full} along dim {dim} does not split over {self.mp_size} ranks")
        lo, hi = self.rank * full // self.mp_size, (self.rank + 1) * full // self.mp_size
        pieces = []
        for i in self.needed:
            t = self._shard(i)[key]
            if t.shape[dim] != per_shard:
                raise ValueError(f"{key} has {t.shape[dim]} along dim {dim} in {self.paths[i].name}, "
                                 f"{per_shard} in {self.paths[self.needed[0]].name}: the shards do not match")
            s, e = max(lo, i * per_shard), min(hi, (i + 1) * per_shard)
            pieces.append(t if (s, e) == (i * per_shard, (i + 1) * per_shard) else t.narrow(dim, s - i * per_shard, e - s))
        return dim, pieces

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of this rank's part of `key`, without reading any data."""
        dim, pieces = self._pieces(key)
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)

    def read(self, key: str, dtype: Optional[torch.dtype] = None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """This rank's part of `key` in `dtype` on `device`: one allocation at most, none when a whole
        shard tensor already has the right dtype and device."""
        dim, pieces = self._pieces(key)
        dtype = dtype or pieces[0].dtype
        if len(pieces) == 1 and pieces[0].is_contiguous():
            out = pieces[0].to(device=device, dtype=dtype)
            if out.data_ptr() == pieces[0].data_ptr():
                return out  # the mapped tensor itself: nothing copied
        else:
            out = torch.empty(self.shape(key), dtype=dtype, device=device)
            offset = 0
            for p in pieces:
                n = p.shape[dim] if dim is not None else p.shape[0]
                out.narrow(dim or 0, offset, n).copy_(p)
                offset += n
        self._copied += sum(p.numel() * p.element_size() for p in pieces)
        if self._copied >= self.REMAP_BYTES:
            self._shards.clear()
            self._copied = 0
        return out


def open_checkpoint(ckpt_dir: str, rank: int, mp_size: int):
    """(params.json's hyper-parameters, a reader of rank's share) for a checkpoint folder in Meta's
    layout (consolidated.NN.pth) or Hugging Face's (config.json and *.safetensors or *.bin)."""
    from llama import hf

    folder = Path(ckpt_dir)
    if not folder.is_dir():
        hint = " (it is a file; pass the folder that holds it)" if folder.exists() else ""
        raise FileNotFoundError(f"checkpoint folder not found: {str(folder)!r}{hint}")
    if not any(folder.glob("*.pth")):
        if hf.is_hf_dir(folder):
            params = hf.read_config(folder)
            return params, hf.HFReader(folder, params, rank, mp_size)
        if not (folder / "params.json").exists():
            raise FileNotFoundError(
                f"{str(folder)!r} is neither a Meta checkpoint (params.json and consolidated.NN.pth, as "
                "download.sh writes them) nor a Hugging Face one (config.json and model*.safetensors)"
            )
    paths = shard_paths(folder)
    return read_params(folder), ShardReader(paths, rank, mp_size)


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
    with its share of the weights of the checkpoint in `ckpt_dir` (Meta's layout with any number of
    shards, or Hugging Face's)."""
    folder = Path(ckpt_dir)
    params, reader = open_checkpoint(ckpt_dir, mp_rank, mp_size)
    args = model_args(params, vocab_size, max_seq_len, max_batch_size, str(folder / "params.json"))
    if "tok_embeddings.weight" in reader.keys() and reader.vocab_rows() != vocab_size:
        raise ValueError(_shape_error("tok_embeddings.weight", (reader.vocab_rows(),), (vocab_size,), vocab_size, folder))
    check_degree(args, mp_size)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    available = set(reader.keys())
    missing = [k for k in expected if k not in available]
    if missing:
        raise ValueError(
            f"{reader.describe()} in {str(folder)!r} lack(s) {len(missing)} weight(s), e.g. {missing[:3]}: "
            "the files are not a Llama checkpoint, or params.json belongs to another model"
        )
    for key, want in expected.items():
        got = reader.shape(key)
        if got != want:
            raise ValueError(_shape_error(key, got, want, vocab_size, folder))
    loaded = {
        key: reader.read(key, dtype, device)
        for key in tqdm(expected, desc=f"loading {reader.describe()}", unit="tensor", disable=None if show_progress else True)
    }
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
