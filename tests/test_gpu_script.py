"""benchmarks/gpu.sh, the script the GPU machine runs, in its quick setting (--shape tiny) on the
test device, so that it never rots between the rare runs on a GPU; and LLAMA_TEST_DEVICE."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from device import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_quick_setting(tmp_path):
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--shape", "tiny", "--no-tests"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=subprocess_env(OUT=str(tmp_path), OMP_NUM_THREADS="2"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["errors"] == [] and result["skipped"] == []
    done = {(r["precision"], r["mode"], r["workload"]) for r in result["rows"]}
    for precision in ("bfloat16", "int8", "int4"):
        for mode in ("eager", "compiled"):
            assert (precision, mode, "decode b1") in done
        for workload in ("decode b8", "prefill", "ragged"):
            assert (precision, "eager", workload) in done
    assert all(r.get("tok_s", 0) > 0 or r.get("seconds", 0) > 0 for r in result["rows"])
    b1 = [r for r in result["rows"] if r["workload"] == "decode b1"]
    assert all(0 < r["copy_roofline"] for r in b1)
    # Quantized weights are smaller: int8 about half of bfloat16's bytes, int4 about a quarter (plus scales).
    size = {r["precision"]: r["weight_gb"] for r in b1}
    assert size["int4"] < size["int8"] < size["bfloat16"]
    assert "int4" in run.stdout and "tok/s" in run.stdout  # the summary table


def test_an_unavailable_test_device_skips_every_test_saying_why(tmp_path):
    """LLAMA_TEST_DEVICE=cuda on a machine without a GPU: skipped, with the reason (never a false pass)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: LLAMA_TEST_DEVICE=cuda runs the suite there")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_answers.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=subprocess_env(LLAMA_TEST_DEVICE="cuda"))
    assert run.returncode == 0, run.stdout[-2000:]
    assert "passed" not in run.stdout and "skipped" in run.stdout
    assert "LLAMA_TEST_DEVICE=cuda, but this PyTorch" in run.stdout
