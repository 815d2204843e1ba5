"""A CPU model's weights in transparent huge pages (Linux).

Decoding streams every weight once per token. With the kernel's default 4 KiB pages, that stream
crosses a page every 4 KiB and the CPU spends much of its time walking page tables: on the 2-core
AMD EPYC VMs of BENCHMARKS.md, a float32 matrix-vector product reads 25 GB/s from ordinary pages
and 40 GB/s from 2 MiB ones. Linux gives huge pages to anonymous memory advised for them
(MADV_HUGEPAGE) where /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise", the
common default. So `move_weights` copies a built model's weights (float parameters and the tensors
of quantized weights) into one such mapping, one tensor at a time, each original freed as its
copy lands (for a memory-mapped checkpoint, the file's pages are released). Elsewhere, or with
LLAMA_HUGE_PAGES=0, it does nothing. The answers do not change: the same values, at other addresses.
"""

import dataclasses
import mmap
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from llama.kernels import QuantizedWeight
from llama.parallel import shared_inputs

HUGE_PAGE = 2 * 2**20
ALIGN = 64  # each tensor starts on a cache line
SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this system gives huge pages to memory advised for them (and LLAMA_HUGE_PAGES is not
    0: with it, a bfloat16 checkpoint in Meta's layout stays memory-mapped, shared with other
    processes mapping the same file and read as first used, at about half the decoding speed)."""
    if os.environ.get("LLAMA_HUGE_PAGES", "1") == "0":
        return False
    try:
        setting = SETTING.read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in setting


def weights(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, name) of every weight the model holds: its parameters, and the tensors of its
    QuantizedWeights (named "weight.data", "weight.scales", "weight.zeros"), in the order they are
    laid out: first, for the layers of each parallel.SharedInput (a block's wq, wk and wv; w1 and
    w3), each kind of tensor of theirs one after another (all values, then all scales, then all
    zeros), so that each kind stacks into one (kernels.join); then the rest, in module order."""
    found = []
    for module in model.modules():
        found += [(module, name) for name, _ in module.named_parameters(recurse=False)]
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantizedWeight):
            found += [(module, f"weight.{f}") for f in ("data", "scales", "zeros") if getattr(weight, f) is not None]
    listed = set(found)
    grouped = [(layer, name) for group in shared_inputs(model)
               for name in ("weight", "weight.data", "weight.scales", "weight.zeros")
               for layer in group.layers if (layer, name) in listed]
    first = set(grouped)
    return grouped + [entry for entry in found if entry not in first]


def get(module: nn.Module, name: str) -> torch.Tensor:
    if name.startswith("weight."):
        return getattr(module.weight, name[len("weight."):])
    return module._parameters[name]


def place(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Point `module`'s parameter `name` (or its QuantizedWeight's field, "weight.FIELD") at `tensor`."""
    if name.startswith("weight."):
        module.weight = dataclasses.replace(module.weight, **{name[len("weight."):]: tensor})
    else:
        module._parameters[name].data = tensor


def move_weights(model: nn.Module) -> int:
    """Copy the model's CPU weights into one mapping advised for huge pages and point the model at
    the copies; tensors shared by several modules (tied embeddings) stay shared. Returns the bytes
    moved (0 where huge pages are not available). No reference to an original is kept here, so
    each is freed once every module that held it holds its copy."""
    found = [(m, n) for m, n in weights(model) if get(m, n).device.type == "cpu"]
    if not found or not available():
        return 0
    keys = [get(m, n).data_ptr() for m, n in found]  # shared tensors (ties) share a key
    offsets: Dict[int, int] = {}  # key -> offset in the arena
    total = 0
    for (module, name), key in zip(found, keys):
        if key not in offsets:
            offsets[key] = total
            total += -(-get(module, name).nbytes // ALIGN) * ALIGN
    arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared memory gets no huge pages
    arena.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # views of it keep the mapping alive
    base = -memory.data_ptr() % HUGE_PAGE  # start on a huge page
    copies: Dict[int, torch.Tensor] = {}
    for (module, name), key in zip(found, keys):
        if key not in copies:
            t = get(module, name)
            start = base + offsets[key]
            copies[key] = memory[start : start + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
            del t
        place(module, name, copies[key])
    return total
