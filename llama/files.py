"""The files of a checkpoint folder, whatever its layout: tensor and GGUF files read by memory map,
JSON read with errors a user can act on, md5 checklists, and a destination folder made ready for
new weights. The lowest floor of the weights code: it knows no layout and no model."""

import hashlib
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import gguf
import numpy as np
import torch
from safetensors import safe_open


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """A shard's tensors, memory-mapped where the file format allows (nothing is read until used).
    Pickled objects other than tensors are refused, never run (torch.load's weights_only)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        if isinstance(e, PermissionError):
            raise
        if _refused_global(e):
            raise ValueError(
                f"{str(path)!r} holds objects other than tensors; refusing to run code from a checkpoint. "
                "Use a file of tensors only: the checkpoint as its publisher made it, or, if you trust this "
                "file, its state dict of tensors saved alone."
            ) from None
        raise ValueError(
            f"could not read checkpoint {str(path)!r}: {e}. The file is incomplete or corrupt "
            "(an interrupted download, or an HTML error page saved in its place); download it again "
            "(download.sh resumes and checks md5 sums)."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{str(path)!r} holds {key!r}, a {type(value).__name__}, where a tensor belongs: a checkpoint "
                "file is a flat state dict of tensors (a training checkpoint keeps them under a key such as "
                "'model'; save that state dict alone)"
            )
    return state


def _refused_global(e: Exception) -> bool:
    """Whether torch.load(weights_only=True) refused a pickled class or function (a GLOBAL), as
    opposed to failing on a damaged file."""
    return "Weights only load failed" in str(e) and "GLOBAL" in str(e)


class _TorchFile:
    """A .pth or .bin file of tensors behind the same small interface as safetensors' safe_open."""

    def __init__(self, path: Path):
        self.state = load_shard(path)

    def keys(self) -> List[str]:
        return list(self.state)

    def get_slice(self, name: str) -> torch.Tensor:
        return self.state[name]


def open_tensor_file(path: Path):
    """A memory-mapped view of one weight file: keys(), and get_slice(name) with lazy slicing."""
    if path.suffix == ".safetensors":
        return safe_open(str(path), framework="pt", device="cpu")
    return _TorchFile(path)


class _GGUFReader(gguf.GGUFReader):
    """gguf's reader on a plain numpy view of the file's memory map (the same pages): the reader
    slices its array once or twice per value of the metadata (half a million times for a 49k-token
    vocabulary with its merges), and each slice of a numpy.memmap runs Python code of its own; a
    plain array's do not (SmolLM2's file opens in 0.5 s instead of 1.6)."""

    @property
    def data(self) -> np.ndarray:
        return self._array

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._array = np.asarray(value)  # a view: the memmap stays alive as its base


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A memory-mapped view of a GGUF file (llama.cpp's format): its metadata fields and tensor
    list, no tensor data read. A damaged file is a ValueError naming it, never a numpy traceback."""
    try:
        return _GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, OSError) as e:
        if isinstance(e, (PermissionError, FileNotFoundError)):
            raise
        raise ValueError(
            f"could not read GGUF file {str(path)!r} ({e}): the file is incomplete or corrupt (an interrupted "
            "download, or an HTML error page saved in its place); download it again"
        ) from None


def read_json(path: Path, hint: str = ""):
    """The JSON value in `path`; a ValueError naming the file (and what to do, `hint`) if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})" + (f"; {hint}" if hint else "")) from None


def md5sum(path: Path) -> str:
    """The md5 digest of a file, read in blocks (a shard may not fit in memory)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def checklist_names(folder: Path) -> List[str]:
    """The file names that folder/checklist.chk (md5sum's format) lists; none without one."""
    path = folder / "checklist.chk"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [parts[1].strip().lstrip("*") for parts in (line.split(maxsplit=1) for line in lines) if len(parts) == 2]


def write_checklist(folder: Path) -> None:
    """checklist.chk in md5sum's format, as Meta's downloads carry it: every other file of `folder`."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{md5sum(p)}  {p.name}\n" for p in files))


def refuse_output_files(folder: Path, suffix: str) -> None:
    """Raise unless `folder` is missing or holds no `suffix` files: new weights never overwrite old ones."""
    if folder.exists() and any(folder.glob(f"*{suffix}")):
        raise FileExistsError(f"{folder} already holds {suffix} files; pass an empty or new folder")


def copy_if_present(src_dir: Path, dst_dir: Path, name: str) -> bool:
    """Copy src_dir/name (e.g. tokenizer.model) into dst_dir if it exists; whether it did."""
    if not (src_dir / name).is_file():
        return False
    shutil.copyfile(src_dir / name, dst_dir / name)
    return True


def rename(name: str, table: Dict[str, str]) -> Optional[str]:
    """`name` translated by a table of tensor names in which "{i}" stands for a layer index, e.g.
    "layers.3.attention.wq.weight" -> "blk.3.attn_q.weight"; None if the table lacks it."""
    m = re.search(r"\.(\d+)\.", name)
    if m:
        pattern = name.replace(m.group(0), ".{i}.", 1)
        return table[pattern].format(i=m.group(1)) if pattern in table else None
    return table.get(name)
