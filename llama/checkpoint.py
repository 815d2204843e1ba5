"""Meta's checkpoint layout: params.json and consolidated.NN.pth shards, read for one model-parallel
rank.

A checkpoint of K shards runs on M model-parallel ranks for any K and M that split the model
evenly: rank r's slice of a weight is cut from the (memory-mapped) shards that overlap it, so a
rank reads only what it needs and nothing is allocated twice."""

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from llama.files import checklist_names, load_shard, read_json
from llama.parallel import shard_dim

SHARD_NAME = re.compile(r"consolidated\.(\d\d)\.pth")
UNUSED_KEYS = ("rope.freqs",)  # carried by Meta's checkpoints, read by no model


def read_params(ckpt_dir: Path) -> dict:
    """params.json's model hyper-parameters, as download.sh writes them."""
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: a checkpoint folder holds params.json, consolidated.NN.pth and "
            "tokenizer.model, as download.sh writes them"
        )
    params = read_json(path, "download it again")
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object of model hyper-parameters")
    return params


def shard_paths(ckpt_dir: Path) -> List[Path]:
    """The consolidated.NN.pth shards of an existing checkpoint folder, in rank order: numbered from
    00 with none missing (also none that its checklist.chk lists) and no other .pth file."""
    paths = sorted(ckpt_dir.glob("*.pth"))
    if not paths:
        raise FileNotFoundError(
            f"no checkpoint files (consolidated.NN.pth) in {str(ckpt_dir)!r}: pass --ckpt_dir the folder "
            "that download.sh made, for example CodeLlama-7b/"
        )
    present = [p.name for p in paths]
    odd = [name for name in present if not SHARD_NAME.fullmatch(name)]
    if odd:
        raise ValueError(
            f"{odd[0]!r} in {str(ckpt_dir)!r} is not a shard name: a checkpoint folder holds consolidated.00.pth, "
            "consolidated.01.pth, ... and no other .pth file; move it out of the folder"
        )
    listed = [name for name in checklist_names(ckpt_dir) if SHARD_NAME.fullmatch(name)]
    count = 1 + max(int(SHARD_NAME.fullmatch(name).group(1)) for name in present + listed)
    missing = [f"consolidated.{i:02d}.pth" for i in range(count) if f"consolidated.{i:02d}.pth" not in present]
    if missing:
        source = "its checklist.chk lists" if len(listed) == count else "the shard numbers make"
        raise FileNotFoundError(
            f"{missing[0]} is missing: {str(ckpt_dir)!r} holds {', '.join(present)} of the {count} shards that "
            f"{source} (consolidated.00.pth .. consolidated.{count - 1:02d}.pth); download the missing "
            f"{len(missing)} again (download.sh resumes and checks md5 sums)"
        )
    unlisted = [name for name in present if listed and name not in listed]
    if unlisted:
        raise ValueError(
            f"{unlisted[0]} in {str(ckpt_dir)!r} is not in its checklist.chk: the folder mixes the shards of "
            "two checkpoints; keep those of one"
        )
    return paths


class ShardReader:
    """Model-parallel rank `rank` of `mp_size`'s view of a checkpoint stored as len(paths) shards.

    Only the shards that overlap the rank's share are opened, memory-mapped. Pages of a mapping
    that have been read stay resident until it is closed, so after copying `REMAP_BYTES` out of
    them the shards are closed (and reopened on the next read): host memory stays near the rank's
    share whatever the model's size."""

    REMAP_BYTES = 1 << 30

    def __init__(self, paths: List[Path], rank: int, mp_size: int):
        self.paths, self.rank, self.mp_size = paths, rank, mp_size
        self.tied = False  # Meta's checkpoints always carry output.weight
        self.grid_keys = frozenset()  # floats, or (python -m llama.quantize) values params.json declares
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
        keys = list(self._shard(self.needed[0]))
        for i in self.needed[1:]:
            if set(self._shard(i)) != set(keys):
                raise ValueError(f"{self.paths[i].name} and {self.paths[self.needed[0]].name} hold different "
                                 "tensors: the shards do not belong to the same checkpoint")
        return keys

    def vocab_rows(self) -> int:
        """The vocabulary size of the checkpoint (the embedding is split by columns: every shard
        has all its rows)."""
        return self._shard(self.needed[0])["tok_embeddings.weight"].shape[0]

    def check_complete(self, dim: int) -> None:
        """Raise if the folder holds fewer shards than the checkpoint was split into: each of K
        shards holds dim / K columns of the embedding, and all of the (replicated) final norm."""
        first = self._shard(self.needed[0])
        if "tok_embeddings.weight" not in first or "norm.weight" not in first or first["norm.weight"].shape != (dim,):
            return  # not what params.json describes: the shape checks say so
        width, k = first["tok_embeddings.weight"].shape[1], len(self.paths)
        if width * k != dim and dim % width == 0 and dim // width > k:
            folder = self.paths[0].parent
            raise FileNotFoundError(
                f"consolidated.{k:02d}.pth is missing: each shard in {str(folder)!r} holds 1/{dim // width} of the "
                f"model (dim={dim}), so it was split into {dim // width} shards, but the folder holds {k}; "
                "download the missing ones again (download.sh resumes and checks md5 sums)"
            )

    def _pieces(self, key: str) -> Tuple[Optional[int], List[torch.Tensor]]:
        """(split dim, [slices of shard tensors that make up this rank's part, in order])."""
        first = self._shard(self.needed[0])
        if key not in first:
            raise KeyError(key)
        dim = shard_dim(key, first[key].dim())
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
            if t.dtype != first[key].dtype:
                raise ValueError(f"{key} is {t.dtype} in {self.paths[i].name}, {first[key].dtype} in "
                                 f"{self.paths[self.needed[0]].name}: the shards do not match")
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

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `key` is stored in, without reading any data."""
        return self._pieces(key)[1][0].dtype

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

    def grids(self, key: str) -> None:
        """None: no weight is stored on 4-bit grids of its own here (loading.WeightReader)."""
        return None
