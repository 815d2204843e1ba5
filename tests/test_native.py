"""The project's CPU matrix-vector kernels (llama/gemv.c through llama/native.py): each format's
product against a float64 one of the same weights within a bound derived from what the kernel
rounds, the tails and tiles of its loops, the seam choosing it, and the fallback where it cannot
serve (PyTorch's kernels, the same answers)."""

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import native
from llama import kernels
from llama.kernels import QuantizedWeight, linear
from llama.quantization import Scheme, dequantize, kernel_weight, quantize

ROOT = Path(__file__).resolve().parent.parent
U = torch.finfo(torch.bfloat16).eps / 2  # bfloat16's unit roundoff
NEEDS = pytest.mark.skipif(not native.available(), reason=f"the project's CPU kernels cannot serve here: {native.why_not()}")


def operands(rows: int, k: int, n: int = 43, seed: int = 0):  # 43 rows of W: whole groups of up to 4 and a rest
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) * 0.05


def int16_error(x: torch.Tensor) -> torch.Tensor:
    """The most the integer kernels' rounding of x moves each entry: x is held per block of
    native.X_BLOCK columns as int16 q times s = max |x| / 32767 of the block, rounded to nearest
    (s / 2), the float32 product x / s and s itself each a unit roundoff off (under 0.01 s)."""
    blocks = x.abs().split(native.X_BLOCK, dim=1)
    return torch.cat([(b.amax(dim=1, keepdim=True) / 32767 * 0.51).expand_as(b) for b in blocks], dim=1).double()


def within(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, x_error: torch.Tensor) -> bool:
    """|got - x w^T| <= x_error |w|^T + K 2**-23 |x| |w|^T elementwise, in float64: each term is
    off by what rounding x costs (x_error, per entry of x), and float32 sums of K terms by at most
    K 2**-24 of the terms' magnitudes (doubled for the final sum across lanes)."""
    x, w = x.double(), w.double()
    bound = x_error @ w.abs().T + x.shape[1] * 2**-23 * (x.abs() @ w.abs().T)
    return bool(((got.double() - x @ w.T).abs() <= bound).all())


@NEEDS
@pytest.mark.parametrize("k", [32, 96, 512, 576])  # a tail of 32 columns after whole chunks of 64 included
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])  # whole tiles of 4 rows and partial ones
def test_float_kernels(rows, k):
    x, w = operands(rows, k)
    assert within(native.matvec(x, "float32", w), x, w, torch.zeros(x.shape, dtype=torch.float64))
    wb = w.bfloat16()
    assert within(native.matvec(x, "bfloat16", wb), x, wb.float(), U * x.abs().double())  # x rounded to bfloat16


@NEEDS
@pytest.mark.parametrize("k", [32, 96, 576])  # one short block of x; whole blocks and a short one
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_int8_kernel(rows, k):
    x, w = operands(rows, k)
    x[0, k // 2] = 300.0  # an outlier: its block of x is rounded more coarsely than the others
    t = quantize(w, Scheme("int8"))
    got = native.matvec(x, "int8", t.values, t.scale)
    assert within(got, x, dequantize(t), int16_error(x))  # the row's scale multiplies a float32 sum


def int4_x_error(x: torch.Tensor) -> torch.Tensor:
    """The most the int4 kernel's rounding of x moves each entry: x is held per block of
    native.INT4_X_BLOCK columns as integers q times s = max |x| / 32512 of the block, rounded to
    nearest (s / 2), the float32 product x / s and s itself each a unit roundoff off (under 0.01 s)."""
    blocks = x.abs().split(native.INT4_X_BLOCK, dim=1)
    return torch.cat([(b.amax(dim=1, keepdim=True) / 32512 * 0.51).expand_as(b) for b in blocks], dim=1).double()


# (group, K): whole superblocks of 16 blocks of 32 columns, and a last one of fewer blocks (576 =
# 16 + 2 blocks, 1152 = 32 + 4, 1280 = 32 + 8), groups spanning 1, 2, 4 and 8 blocks
INT4_SHAPES = [(32, 32), (32, 576), (64, 576), (128, 512), (128, 1152), (256, 1280)]


@NEEDS
@pytest.mark.parametrize("group,k", INT4_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
def test_int4_kernel(rows, group, k):
    x, w = operands(rows, k)
    x[0, k // 3] = 300.0  # an outlier: its block of x is rounded more coarsely than the others
    w[3] += 4.0  # groups far from zero: the zero term carries them
    t = quantize(w, Scheme("int4", group))
    weight = kernel_weight(t, torch.device("cpu"))
    n = w.shape[0]
    assert weight.zeros is not None and weight.data.shape == (n, k // 2)
    got = native.matvec(x, "int4", weight.data, weight.scales, weight.zeros, group, n)
    # x rounded per block (int4_x_error a term); then float32 sums of scale * q x and of
    # (zero - 8 scale) x, K 2**-23 of those terms' magnitudes
    deq = dequantize(t).double()
    q = t.values.double()
    s = t.scale.double().repeat_interleave(group, 1)
    c = t.zero.double().repeat_interleave(group, 1) - 8 * s
    xd = x.double()
    bound = int4_x_error(x) @ deq.abs().T + k * 2**-23 * (xd.abs() @ (q * s.abs() + c.abs()).T)
    assert ((got.double() - xd @ deq.T).abs() <= bound).all()
    # the bound is tight enough to see a wrong layout: the same product with the weight's blocks
    # read in another order misses it
    wrong = weight.data.view(n, -1, 16).flip(1).reshape(n, -1).contiguous() if k >= 512 else None
    if wrong is not None:
        bad = native.matvec(x, "int4", wrong, weight.scales, weight.zeros, group, n)
        assert not ((bad.double() - xd @ deq.T).abs() <= bound).all()


@NEEDS
def test_int4_kernel_ignores_what_an_earlier_product_left():
    """The kernels round x into scratch memory kept between calls; a product whose last group of
    blocks is partial must not read the lanes past it as an earlier, wider product left them. Here
    the earlier product's x has an infinite entry in block 20 (its scale infinite), then a product
    of 18 blocks (lanes 2..15 of its second group empty, lane 4 where block 20 was) answers as it
    does in a fresh process."""
    x, w = operands(1, 576)
    weight = kernel_weight(quantize(w, Scheme("int4", 32)), torch.device("cpu"))
    fresh = native.matvec(x, "int4", weight.data, weight.scales, weight.zeros, 32, w.shape[0])
    wide_x, wide_w = operands(1, 1024, seed=1)
    wide_x[0, 20 * 32 + 5] = float("inf")
    wide = kernel_weight(quantize(wide_w, Scheme("int4", 32)), torch.device("cpu"))
    native.matvec(wide_x, "int4", wide.data, wide.scales, wide.zeros, 32, wide_w.shape[0])
    again = native.matvec(x, "int4", weight.data, weight.scales, weight.zeros, 32, w.shape[0])
    assert torch.isfinite(again).all() and torch.equal(again, fresh)


@NEEDS
@pytest.mark.parametrize("group,k", INT4_SHAPES)
def test_int4_dequantization(group, k):
    """An int4 weight widened for a prompt's product: float32 values exactly as `dequantize` makes
    them, or those rounded to bfloat16."""
    w = operands(1, k)[1]
    t = quantize(w, Scheme("int4", group))
    weight = kernel_weight(t, torch.device("cpu"))
    exact = dequantize(t)
    assert exact.dtype == torch.float32
    widen = functools.partial(native.dequantize_int4, weight.data, weight.scales, weight.zeros, group, weight.shape)
    assert torch.equal(widen(torch.float32), exact)
    assert torch.equal(widen(torch.bfloat16), exact.bfloat16())


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """gemv.c's int4 layout read back column by column, as its comment describes it: column k of a
    row is in block b = k // 32 at c = k % 32; the blocks come 16 to 256 bytes, the last m <= 16
    of a row after the whole ones; in those, the byte 4 m (c // 8) + 4 (b % 16) + c % 4 holds it,
    in its low half if c % 8 < 4."""
    out = torch.empty(packed.shape[0], k, dtype=torch.uint8)
    blocks = k // 32
    for col in range(k):
        b, c = divmod(col, 32)
        m = min(16, blocks - b // 16 * 16)
        byte = packed[:, b // 16 * 256 + 4 * m * (c // 8) + 4 * (b % 16) + c % 4]
        out[:, col] = byte & 15 if c % 8 < 4 else byte >> 4
    return out


@NEEDS
@pytest.mark.parametrize("k", [32, 512, 576])
def test_int4_packing_round_trips(k):
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 16, (8, k), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_int4(native.pack_int4(values), k), values)


@NEEDS
def test_linear_takes_the_kernels_for_few_rows_only(monkeypatch):
    """`linear` sends up to MAX_ROWS rows of a float or int8 product to these kernels, more to PyTorch's."""
    calls = []
    monkeypatch.setattr(native, "matvec", lambda x, kind, data, *rest, **named: calls.append(kind)
                        or torch.zeros(*x.shape[:-1], data.shape[0], dtype=x.dtype))
    x, w = operands(1, 64)
    for weight in (w, w.bfloat16(), kernel_weight(quantize(w, Scheme("int8")), torch.device("cpu"))):
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else x.dtype
        linear(x.to(dtype), weight)
        linear(torch.randn(native.MAX_ROWS + 1, 64, dtype=dtype), weight)
    assert calls == ["float32", "bfloat16", "int8"]


@NEEDS
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_many_rows_match_few_rows(mode):
    """A prompt's rows (PyTorch's bfloat16 product of the widened weights) and a decode step's (these
    kernels) give the same products up to bfloat16 rounding."""
    x, w = operands(40, 256)
    weight = kernel_weight(quantize(w, Scheme(mode, None if mode == "int8" else 64)), torch.device("cpu"))
    assert isinstance(weight, QuantizedWeight)
    together = linear(x, weight)
    alone = torch.cat([linear(x[i:i + 1], weight) for i in range(40)])
    torch.testing.assert_close(together, alone, rtol=4 * U, atol=4 * U * together.abs().max().item())


@NEEDS
def test_prompts_multiply_in_float32_without_native_bfloat16(monkeypatch):
    """On a CPU without native bfloat16 products (kernels.cpu_multiplies_bfloat16 false: Intel Ice
    Lake, where PyTorch's bfloat16 products run at a third of its float32 ones), many rows of a
    quantized product are multiplied in float32, with the results of the bfloat16 products up to
    bfloat16's rounding of x."""
    cpu = torch.device("cpu")
    x, w = operands(40, 256)
    products = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, b: products.append((a.dtype, b.dtype)) or real(a, b))
    for weight in (kernel_weight(quantize(w, Scheme("int8")), cpu), kernel_weight(quantize(w, Scheme("int4", 64)), cpu)):
        monkeypatch.setattr(kernels, "cpu_multiplies_bfloat16", lambda: True)
        natively = linear(x, weight)
        assert products[-1] == (torch.bfloat16, torch.bfloat16)
        monkeypatch.setattr(kernels, "cpu_multiplies_bfloat16", lambda: False)
        widened = linear(x, weight)
        assert products[-1] == (torch.float32, torch.float32) and widened.dtype == x.dtype
        torch.testing.assert_close(widened, natively, rtol=4 * U, atol=4 * U * natively.abs().max().item())


def run_python(code: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_fallback_when_turned_off_gives_the_same_answers(tiny_dir):
    """LLAMA_NATIVE=0 turns the kernels off (why_not says so) and PyTorch's give the same greedy answers."""
    code = f"""
from llama import Llama, native
g = Llama.build({str(tiny_dir)!r}, {str(tiny_dir / 'tokenizer.model')!r}, 64, 2, device="cpu", dtype="float32")
print(repr(native.why_not()), g.generate([[1, 5, 9, 30], [1, 7]], 8, temperature=0)[0])
"""
    off = run_python(code, LLAMA_NATIVE="0").splitlines()[-1]
    assert off.startswith("'LLAMA_NATIVE=0'")
    on = run_python(code).splitlines()[-1]
    assert on.split(" ", 1)[1] == off.split(" ", 1)[1]


def test_compiles_once_into_the_cache_folder(tmp_path):
    """The library is built into LLAMA_NATIVE_CACHE on first use and reused from there; a missing
    compiler is a reason, not an error. The build here reads a number of rows of W side by side in
    batch-1 products (LLAMA_NATIVE_ROWS; by default chosen by the CPU's vendor, native.rows_at_once)
    that this machine does not use by default (3, so that 43 rows end in a group of 1), and passes
    the kernel tests above."""
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler here: the kernels are not built (PyTorch's serve)")
    rows = {"LLAMA_NATIVE_ROWS": "3" if native.rows_at_once() != 3 else "2"}
    code = "from llama import native; print(native.kernels() is not None, repr(native.why_not()))"
    first = run_python(code, LLAMA_NATIVE_CACHE=str(tmp_path), **rows)
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    if native.available():
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                               "float_kernels or int8_kernel or int4_kernel"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "LLAMA_NATIVE_CACHE": str(tmp_path), **rows})
        assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert run_python(code, LLAMA_NATIVE_CACHE=str(tmp_path), **rows) == first
    assert list(tmp_path.glob("kernels-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    missing = run_python(code, LLAMA_NATIVE_CACHE=str(tmp_path / "other"), CC="no-such-compiler")
    assert missing.strip() == "False \"no C compiler ('no-such-compiler' not found; set CC)\""


def test_rows_at_once_is_checked(monkeypatch):
    monkeypatch.setenv("LLAMA_NATIVE_ROWS", "8")
    with pytest.raises(ValueError, match="LLAMA_NATIVE_ROWS must be 1, 2, 3 or 4"):
        native.rows_at_once()


def test_importing_needs_no_setuptools():
    """The kernels are built against PyTorch's headers without torch.utils.cpp_extension, which
    imports setuptools (absent from a fresh virtual environment on Python 3.12 and later)."""
    code = ("import sys, llama.native, llama.generation, llama.server; "
            "print('setuptools' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)")
    assert run_python(code).split() == ["False", "False"]
