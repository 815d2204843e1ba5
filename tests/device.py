"""The device the suite runs its models on: LLAMA_TEST_DEVICE=cpu (the default) or cuda.

    LLAMA_TEST_DEVICE=cuda python -m pytest -q

runs every device-independent test on the GPU: the models the tests build, compiled decode (CUDA
graphs there) against eager, bfloat16, the quantized kernels, the server. Tests of one device's
own behaviour (the CPU's int4 packing, a process's resident memory) name their device. A test that
starts several processes needs one GPU per process under cuda, and says so when it skips.
Subprocesses run on the test device too: under cpu they are kept off any GPU the machine has.
"""

import os
from typing import Dict

import pytest
import torch

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"LLAMA_TEST_DEVICE={DEVICE!r}: use 'cpu' (the default) or 'cuda'")
ON_CUDA = DEVICE == "cuda"
# Why the suite cannot run on the device asked for (conftest skips every test, saying so), or None.
UNAVAILABLE = (f"LLAMA_TEST_DEVICE=cuda, but this PyTorch ({torch.__version__}) sees no CUDA GPU: unset it to test "
               "on the CPU" if ON_CUDA and not torch.cuda.is_available() else None)


def need_processes(n: int) -> None:
    """Skip unless `n` processes can each have a device of the test's kind (always on the CPU)."""
    if ON_CUDA and not UNAVAILABLE and torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} processes on {n} GPUs under LLAMA_TEST_DEVICE=cuda; this machine has "
                    f"{torch.cuda.device_count()} (the CPU run covers it with gloo)")


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment for a subprocess of a test: the test device, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA_TEST_DEVICE": DEVICE, **extra}
    if not ON_CUDA:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine's subprocesses run where the test's expectations were made
    return env
