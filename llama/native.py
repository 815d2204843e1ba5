"""The project's own CPU kernels, compiled for this machine on first use: matrix-vector products
(llama/gemv.c), attention of a few new tokens over the KV cache (llama/attention.c), and every
decoder layer of a few new tokens in one parallel region (llama/layer.c), sharing kernels.h.

Batch-1 decoding on a CPU is bound by the bytes of weights read per token; PyTorch's products for a
few rows read them at about half the machine's bandwidth (BENCHMARKS.md). gemv.c reads them at
about the bandwidth, for float32, bfloat16, int8 and int4 weights. The C files and llama/ops.cpp,
which makes them the PyTorch operators `llama::gemv`, `llama::attend` and `llama::decode_layers`
(called from C++ by eager code and by torch.compile's generated code alike), are built once per
machine and source (`cc -O3 -march=native -fopenmp`, then `c++` against PyTorch's headers: about
ten seconds) into a cache folder (`$LLAMA_NATIVE_CACHE`, default `~/.cache/codellama/native`).

Where they cannot serve (no C or C++ compiler, a CPU without AVX-512 VNNI: they need Intel Cascade
Lake, Ice Lake or Sapphire Rapids, AMD Zen 4 or later; `LLAMA_NATIVE=0`), `kernels()` is None and
PyTorch's kernels are used (llama/kernels.py, llama/attention.py; the model's blocks as written,
llama/layer_step.py): the answers are the same up to rounding. `why_not()` says which.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import torch

HERE = Path(__file__).parent
C_SOURCES = [HERE / "gemv.c", HERE / "attention.c", HERE / "layer.c"]
HEADER = HERE / "kernels.h"  # what they and ops.cpp share
CPP_SOURCE = HERE / "ops.cpp"
TORCH = Path(torch.__file__).parent  # its headers and libraries (what torch.utils.cpp_extension names, without
#                                      importing it: it needs setuptools)
C_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
MAX_ROWS = 16  # rows of x (a decode batch) up to which these kernels beat PyTorch's products
CHUNK = 32  # K must be a multiple of this
X_BLOCK = 128  # the int8 kernel rounds x to int16 in blocks of this many columns, a scale each (gemv.c XB)
INT4_X_BLOCK = 32  # the int4 kernel rounds x to 15-bit integers in blocks of this many columns, a scale each (gemv.c)
INT4_LANES = 16  # blocks of 32 columns in one of the int4 layout's superblocks (gemv.c LANES)

# The operators' schemas; llama/ops.cpp implements them for the CPU when the library loads.
OPERATORS = torch.library.Library("llama", "DEF")
OPERATORS.define("gemv(Tensor x, str kind, Tensor data, Tensor? scales, Tensor? zeros, int group_size, int n) -> Tensor")
OPERATORS.define("attend(Tensor q, Tensor keys, Tensor values, Tensor last) -> Tensor")
OPERATORS.define("decode_layers(Tensor h, Tensor[] norms, float eps, Tensor[] weights, float rope_theta, "
                 "Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, Tensor last, int n_heads) -> Tensor")


@torch.library.register_fake("llama::gemv")
def _(x, kind, data, scales, zeros, group_size, n):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@torch.library.register_fake("llama::attend")
def _(q, keys, values, last):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.register_fake("llama::decode_layers")
def _(h, norms, eps, weights, rope_theta, cache_k, cache_v, last, n_heads):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def cache_folder() -> Path:
    return Path(os.environ.get("LLAMA_NATIVE_CACHE") or Path.home() / ".cache" / "codellama" / "native")


def rows_at_once() -> int:
    """Rows of W each thread reads side by side in a batch-1 product (gemv.c ROWS): 4 on Intel,
    whose cores read a single stream at about two thirds of their bandwidth, 1 elsewhere (AMD's
    Zen 4 reads one stream at full speed, measured so); `$LLAMA_NATIVE_ROWS` (1 to 4) overrides."""
    chosen = os.environ.get("LLAMA_NATIVE_ROWS")
    if chosen:
        if chosen not in ("1", "2", "3", "4"):
            raise ValueError(f"LLAMA_NATIVE_ROWS must be 1, 2, 3 or 4, not {chosen!r}")
        return int(chosen)
    try:
        return 4 if "GenuineIntel" in Path("/proc/cpuinfo").read_text() else 1
    except OSError:
        return 1


def c_flags() -> List[str]:
    return C_FLAGS + [f"-DROWS={rows_at_once()}"]


def cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return os.uname().machine


def cpp_command(cxx: str, objects: List[str], out: str) -> List[str]:
    """Link the C objects with ops.cpp, built against this PyTorch."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             str(CPP_SOURCE), *objects, "-o", out, "-lm"]
            + [f"-I{TORCH / 'include'}", f"-I{TORCH / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
            + [f"-L{TORCH / 'lib'}", f"-Wl,-rpath,{TORCH / 'lib'}", "-ltorch_cpu", "-lc10"])


def compile_library(path: Path) -> str:
    """Build the library at `path`; "" or why it could not."""
    cc, cxx = os.environ.get("CC") or "cc", os.environ.get("CXX") or "c++"
    if not shutil.which(cc):
        return f"no C compiler ({cc!r} not found; set CC)"
    if not shutil.which(cxx):
        return f"no C++ compiler ({cxx!r} not found; set CXX)"
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"llama: compiling the CPU kernels for this machine into {path.parent} (once, about ten seconds)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = [str(Path(tmp) / (src.stem + ".o")) for src in C_SOURCES]
        out = str(Path(tmp) / path.name)
        steps = [(src.name, [cc, *c_flags(), "-c", str(src), "-o", obj]) for src, obj in zip(C_SOURCES, objects)]
        for name, command in steps + [(CPP_SOURCE.name, cpp_command(cxx, objects, out))]:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                return f"{command[0]} could not compile {name}: {done.stderr.strip()[-500:]}"
        os.replace(out, path)  # atomic: processes building side by side each install a whole file
    return ""


@functools.lru_cache(maxsize=None)
def build() -> "tuple[Optional[ctypes.CDLL], str]":
    """(the compiled library, "") or (None, why not). Compiled once per machine and source; loading
    it registers llama::gemv, llama::attend and llama::decode_layers for the CPU."""
    if os.environ.get("LLAMA_NATIVE", "1") == "0":
        return None, "LLAMA_NATIVE=0"
    sources = b"".join(src.read_bytes() for src in C_SOURCES + [HEADER, CPP_SOURCE])
    key = hashlib.sha256(sources + " ".join(c_flags()).encode() + torch.__version__.encode() + cpu_signature().encode())
    path = cache_folder() / f"kernels-{key.hexdigest()[:16]}.so"
    if not path.exists():
        problem = compile_library(path)
        if problem:
            return None, problem
    lib = ctypes.CDLL(str(path))
    if not lib.native_supported():
        return None, "this CPU lacks AVX-512 with VNNI (Intel Cascade Lake or later, AMD Zen 4 or later have it)"
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.dequantize_int4.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i32, i32]
    lib.dequantize_int4.restype = None
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
    PyTorch's there): a few rows, on the CPU, k a multiple of `chunk`."""
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
                    shape, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An int4 weight in gemv.c's layout as `dtype` (bfloat16 or float32), (N, K): for products of
    many rows."""
    n, k = shape
    out = torch.empty(n, k, dtype=dtype)
    kernels().dequantize_int4(data.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size, n, k,
                              out.data_ptr(), int(dtype == torch.float32), torch.get_num_threads())
    return out


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """values (N, K) in [0, 15] -> gemv.c's int4 layout (N, K / 2) uint8. Each row in blocks of 32
    columns, 16 blocks (256 bytes) at a time, the last group of blocks holding m <= 16: 4 vectors
    of 4m bytes, bytes 4i .. 4i+3 of vector p holding columns 8p .. 8p+3 of block i in their low
    halves and 8p+4 .. 8p+7 in their high halves (a vector lane is a block)."""
    n, k = values.shape
    blocks = values.to(torch.uint8).reshape(n, k // 32, 4, 2, 4)  # (row, block, p, half, column)
    nibbles = blocks[:, :, :, 0] | (blocks[:, :, :, 1] << 4)  # (row, block, p, column)
    parts = [nibbles[:, b:b + INT4_LANES].transpose(1, 2).reshape(n, -1)  # (row, p, block, column)
             for b in range(0, k // 32, INT4_LANES)]
    return torch.cat(parts, dim=1).contiguous()


def matvec(x: torch.Tensor, kind: str, data: torch.Tensor, scales: Optional[torch.Tensor] = None,
           zeros: Optional[torch.Tensor] = None, group_size: int = 0, n: Optional[int] = None) -> torch.Tensor:
    """x (..., K) W^T in x's dtype, W (n, K) in `kind`'s layout (see gemv.c), through llama::gemv."""
    n = data.shape[0] if n is None else n
    a = x.reshape(-1, x.shape[-1])
    if a.dtype != torch.float32:
        a = a.float()
    if not a.is_contiguous():
        a = a.contiguous()
    y = torch.ops.llama.gemv(a, kind, data, scales, zeros, group_size, n).view(*x.shape[:-1], n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


ATTENTION_DTYPES = (torch.float32, torch.bfloat16)  # of the KV cache


def attention_takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `attend` takes these: a few new tokens on the CPU, a float32 or bfloat16 cache whose
    head dimension is contiguous and a multiple of 16, keys and values laid out alike."""
    return (keys.dtype in ATTENTION_DTYPES and values.dtype == keys.dtype and keys.stride() == values.stride()
            and keys.stride(-1) == 1 and q.shape[2] % keys.shape[1] == 0
            and takes(q.shape[1], keys.shape[-1], q.device, chunk=16))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V of q (B, T, H, D) over keys and values (B, H_kv, S, D), query t
    of row b seeing positions 0 .. min(last[b, t], S - 1): (B, T, H, D) in q's dtype, through
    llama::attend (see `attention_takes` for what it takes)."""
    out = torch.ops.llama.attend(q.float().contiguous(), keys, values, last.contiguous())
    return out if q.dtype == torch.float32 else out.to(q.dtype)
