"""Process groups, devices and dtypes: torchrun or plain python, one node or several, CUDA, MPS
or CPU; and the check that a CUDA allocation fits before it is made."""

import atexit
import contextlib
import io
import os
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.checks import is_int


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on global rank 0, the process that prints."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The dtype asked for, else bfloat16 on CUDA (float16 where bf16 is unsupported), float16 on
    MPS, float32 on CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """The device for this process: the one asked for, else CUDA (GPU LOCAL_RANK), else MPS
    (single process only), else CPU. A bare "cuda" means GPU LOCAL_RANK."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available() and world_size() == 1:
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but PyTorch sees no CUDA GPU; use device='cpu'")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: start at "
                    "most one process per GPU (torchrun --nproc_per_node N with N <= the number of GPUs)"
                )
            device = torch.device("cuda", local_rank)
    return device


def setup_model_parallel(model_parallel_size: Optional[int], device: torch.device) -> int:
    """Join (or make) the process group and fairscale's model-parallel groups; returns the degree.

    Under torchrun every process joins through the environment (nccl for CUDA, gloo otherwise).
    A plain `python` run makes a one-process group that needs no network. Calling this again in
    the same process reuses the groups, so Llama.build can be called more than once."""
    if not dist.is_initialized():
        n = int(os.environ.get("WORLD_SIZE", 1))
        if n > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(_destroy)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    n = dist.get_world_size()
    mp = n if model_parallel_size is None else model_parallel_size
    if not is_int(mp) or mp < 1 or n % mp != 0:
        raise ValueError(
            f"model_parallel_size={model_parallel_size!r} must be a positive divisor of the number of "
            f"processes ({n}); start one process per model-parallel rank, e.g. torchrun --nproc_per_node {mp}"
        )
    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() == mp:
            return mp
        fs_init.destroy_model_parallel()
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
        fs_init.initialize_model_parallel(mp)
    return mp


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_cuda_room(nbytes: int, device: torch.device, what: str, advice: str) -> None:
    """Raise before allocating `nbytes` on a CUDA device that cannot hold them."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if nbytes > free + cached:
        raise torch.cuda.OutOfMemoryError(
            f"{what} needs {nbytes / 2**30:.1f} GiB but only {(free + cached) / 2**30:.1f} GiB are free on {device}: "
            f"{advice} (python -m llama.memory estimates what fits)"
        )
