"""The project's own CPU matrix-vector kernels (llama/gemv.c), compiled for this machine on first use.

Batch-1 decoding on a CPU is bound by the bytes of weights read per token; PyTorch's products for a
few rows read them at about half the machine's bandwidth (BENCHMARKS.md). gemv.c reads them at
about the bandwidth, for float32, bfloat16, int8 and int4 weights. It is compiled once per machine
and source (`cc -O3 -march=native -fopenmp`, about a second) into a cache folder
(`$LLAMA_NATIVE_CACHE`, default `~/.cache/codellama/native`) and called through ctypes; inside
torch.compile'd code through the custom op `llama::gemv`.

Where it cannot serve (no C compiler, a CPU without AVX-512 VNNI and BF16, `LLAMA_NATIVE=0`),
`kernels()` is None and llama/kernels.py uses PyTorch's kernels: the answers are the same up to
rounding. `why_not()` says which.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 16  # rows of x (a decode batch) up to which these kernels beat PyTorch's products
CHUNK = 32  # K must be a multiple of this (of INT4_CHUNK for int4 weights)
INT4_CHUNK = 64
X_BLOCK = 128  # the integer kernels round x to int16 in blocks of this many columns, a scale each (gemv.c XB)


def cache_folder() -> Path:
    return Path(os.environ.get("LLAMA_NATIVE_CACHE") or Path.home() / ".cache" / "codellama" / "native")


def cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return os.uname().machine


@functools.lru_cache(maxsize=None)
def build() -> "tuple[Optional[ctypes.CDLL], str]":
    """(the compiled library, "") or (None, why not). Compiled once per machine and source."""
    if os.environ.get("LLAMA_NATIVE", "1") == "0":
        return None, "LLAMA_NATIVE=0"
    cc = os.environ.get("CC") or "cc"
    if not shutil.which(cc):
        return None, f"no C compiler ({cc!r} not found; set CC)"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc] + FLAGS).encode() + cpu_signature().encode())
    path = cache_folder() / f"gemv-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                return None, f"{cc} could not compile {SOURCE.name}: {done.stderr.strip()[-500:]}"
            os.replace(out, path)  # atomic: processes building side by side each install a whole file
    lib = ctypes.CDLL(str(path))
    if not lib.native_supported():
        return None, "this CPU lacks AVX-512 with VNNI and BF16"
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.gemv_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, i32]
    lib.gemv_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, i32]
    lib.gemv_int8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.gemv_int4.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, i32]
    lib.dequantize_int4.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i32]
    for f in (lib.gemv_f32, lib.gemv_bf16, lib.gemv_int8, lib.gemv_int4, lib.dequantize_int4):
        f.restype = None
    return lib, ""


def kernels() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None where they cannot serve (`why_not()` says why)."""
    return build()[0]


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernels serve here (a constant to torch.compile)."""
    return kernels() is not None


def why_not() -> str:
    """Why kernels() is None ("" when it is not)."""
    return build()[1]


def takes(rows: int, k: int, device: torch.device, chunk: int = CHUNK) -> bool:
    """Whether these kernels take a product of `rows` rows of width `k` on `device` (and beat
    PyTorch's there): a few rows, on the CPU, k a multiple of `chunk` (INT4_CHUNK for int4)."""
    return rows <= MAX_ROWS and device.type == "cpu" and k % chunk == 0 and available()


FLOAT_KINDS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def float_kind(weight: torch.Tensor, rows: int) -> Optional[str]:
    """The kernel for x (rows, K) times a float weight (N, K) ("float32" or "bfloat16"), or None
    where PyTorch's product does as well or these kernels cannot take it."""
    if (weight.dtype not in FLOAT_KINDS or weight.dim() != 2 or not weight.is_contiguous()
            or not takes(rows, weight.shape[1], weight.device)):
        return None
    return FLOAT_KINDS[weight.dtype]


def dequantize_int4(data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    shape) -> torch.Tensor:
    """An int4 weight in gemv.c's layout as bfloat16 (N, K): for products of many rows."""
    n, k = shape
    out = torch.empty(n, k, dtype=torch.bfloat16)
    kernels().dequantize_int4(data.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size, n, k,
                              out.data_ptr(), torch.get_num_threads())
    return out


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """values (N, K) in [0, 15] -> gemv.c's int4 layout (N, K / 2) uint8: in each 64-column chunk,
    byte j holds column j (low half) and column j + 32 (high half)."""
    n, k = values.shape
    chunks = values.to(torch.uint8).reshape(n, k // INT4_CHUNK, 2, INT4_CHUNK // 2)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def run(x: torch.Tensor, kind: str, data: torch.Tensor, scales: Optional[torch.Tensor], zeros: Optional[torch.Tensor],
        group_size: int, n: int) -> torch.Tensor:
    """y (M, n) float32 = x (M, K) W^T, W in `kind`'s layout (see gemv.c); x is float32 and contiguous."""
    lib = build()[0]
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    if kind == "float32":
        lib.gemv_f32(x.data_ptr(), m, k, data.data_ptr(), n, y.data_ptr(), threads)
    elif kind == "bfloat16":
        lib.gemv_bf16(x.data_ptr(), m, k, data.data_ptr(), n, y.data_ptr(), threads)
    elif kind == "int8":
        lib.gemv_int8(x.data_ptr(), m, k, data.data_ptr(), scales.data_ptr(), n, y.data_ptr(), threads)
    else:
        lib.gemv_int4(x.data_ptr(), m, k, data.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size, n,
                      y.data_ptr(), threads)
    return y


# `run` as an operator torch.compile can trace (its result's shape is all it needs to know). Defined
# with the low-level registration: a call through the dispatcher costs about 4 microseconds more
# than `run` itself, where torch.library.custom_op's wrapper costs 11, and a compiled decode step
# makes some 100 of them.
OPERATORS = torch.library.Library("llama", "DEF")
OPERATORS.define("gemv(Tensor x, str kind, Tensor data, Tensor? scales, Tensor? zeros, int group_size, int n) -> Tensor")
OPERATORS.impl("gemv", run, "CPU")


@torch.library.register_fake("llama::gemv")
def _(x, kind, data, scales, zeros, group_size, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


def matvec(x: torch.Tensor, kind: str, data: torch.Tensor, scales: Optional[torch.Tensor] = None,
           zeros: Optional[torch.Tensor] = None, group_size: int = 0, n: Optional[int] = None) -> torch.Tensor:
    """x (..., K) W^T in x's dtype, through the kernels: called directly when eager (a few
    microseconds: this runs some 100 times a token), as the custom op when torch.compile traces it."""
    n = data.shape[0] if n is None else n
    a = x.reshape(-1, x.shape[-1])
    if a.dtype != torch.float32:
        a = a.float()
    if not a.is_contiguous():
        a = a.contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.llama.gemv(a, kind, data, scales, zeros, group_size, n)
    else:
        y = run(a, kind, data, scales, zeros, group_size, n)
    y = y.view(*x.shape[:-1], n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
