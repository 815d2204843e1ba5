"""User errors at the command line (llama/cli.py): one message on stderr, exit status 1, no traceback;
the traceback with LLAMA_DEBUG=1 (or --debug); library callers still get the exception.

Under torchrun, the launcher itself reports a worker that exits non-zero: it logs "Sending process
N closing signal SIGTERM" and "failed (exitcode: 1) local_rank: 0", then raises ChildFailedError,
which prints a traceback of torch/distributed/run.py and a "<script> FAILED" table (rank 0 as the
root cause with exitcode 1 and "error_file: <N/A>", the other rank as stopped by SIGTERM). That is
torchrun's output, not ours: the tests assert what the workers print (our message once, and no
traceback from a worker: no "[rank0]: Traceback", no frame from the script or from llama/).
"""

import re

import pytest

from test_distributed import torchrun
from test_examples import ROOT, python as run_python

from llama import cli

MESSAGE = "example_completion.py: error: prompt 0 has 64 tokens, more than max_seq_len=8"
OUR_FRAMES = re.compile(r'File "[^"]*(example_completion\.py|/llama/[a-z_]+\.py)", line')


def python(*args, debug=False):
    return run_python(*args, env={"LLAMA_DEBUG": "1" if debug else "0"})


def completion(*args):
    return [ROOT / "example_completion.py", *args]


def assert_one_clean_message(run, message=MESSAGE):
    assert run.returncode != 0
    assert run.stderr.count(message) == 1, run.stderr[-3000:]
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr, run.stderr[-3000:]
    assert not OUR_FRAMES.search(run.stderr), run.stderr[-3000:]


def test_prompt_too_long_in_plain_python(tiny_dir):
    run = python(*completion("--ckpt_dir", tiny_dir, "--max_seq_len", "8"))
    assert run.returncode == 1
    assert_one_clean_message(run)
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


def test_prompt_too_long_under_torchrun(tiny_mp2_dir):
    run = torchrun(*completion("--ckpt_dir", tiny_mp2_dir, "--tokenizer_path", tiny_mp2_dir / "tokenizer.model",
                               "--max_seq_len", "8"), nproc=2)
    assert run.returncode != 0
    assert_one_clean_message(run)
    assert "[rank 1]" not in run.stderr  # rank 1 met the same error and was stopped without a word


def test_debug_shows_the_traceback(tiny_dir):
    run = python(*completion("--ckpt_dir", tiny_dir, "--max_seq_len", "8"), debug=True)
    assert run.returncode == 1
    assert "Traceback (most recent call last)" in run.stderr and OUR_FRAMES.search(run.stderr)
    assert "ValueError: prompt 0 has 64 tokens, more than max_seq_len=8" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--ckpt_dir", "/nonexistent/CodeLlama-7b"], "checkpoint folder not found: '/nonexistent/CodeLlama-7b'"),
    (["--max_seq_len", "abc"], "max_seq_len must be a positive integer, got 'abc'"),
])
def test_bad_path_and_bad_flag_value(tiny_dir, args, message):
    run = python(*completion("--ckpt_dir", tiny_dir, *args))
    assert_one_clean_message(run, f"example_completion.py: error: {message}")


@pytest.mark.parametrize("tool, args", [
    ("reshard", ["/nonexistent/src", "{tmp}/out", "--mp", "2"]),
    ("convert", ["to-hf", "/nonexistent/src", "{tmp}/out"]),
    ("quantize", ["--ckpt_dir", "/nonexistent/src", "--out", "{tmp}/out", "--mode", "int8"]),
    ("memory", ["--ckpt_dir", "/nonexistent/src", "--max_seq_len", "10"]),
    ("tiny", ["{tmp}/out", "--mp", "3"]),
])
def test_tools_report_user_errors_in_one_line(tool, args, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    run = python("-m", f"llama.{tool}", *args)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m llama.{tool}: error: "), run.stderr
    if tool == "reshard":
        debug = python("-m", f"llama.{tool}", *args, debug=True)
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_user_errors_context(capsys, monkeypatch):
    monkeypatch.delenv("LLAMA_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e, cli.user_errors("prog"):
        raise FileNotFoundError("no such checkpoint")
    assert e.value.code == 1 and capsys.readouterr().err == "prog: error: no such checkpoint\n"
    with pytest.raises(KeyError), cli.user_errors("prog"):  # a bug keeps its traceback
        raise KeyError("x")
    with pytest.raises(ValueError), cli.user_errors("prog", debug=True):
        raise ValueError("bad")
    monkeypatch.setenv("LLAMA_DEBUG", "1")
    with pytest.raises(ValueError), cli.user_errors("prog"):
        raise ValueError("bad")
    monkeypatch.setenv("LLAMA_DEBUG", "0")
    with pytest.raises(SystemExit), cli.user_errors("prog"):
        raise ValueError("bad")


def test_a_tool_with_debug_flag_keeps_the_traceback(monkeypatch):
    monkeypatch.delenv("LLAMA_DEBUG", raising=False)

    @cli.reports_user_errors("prog")
    def main(argv=None):
        raise ValueError("bad value")

    with pytest.raises(SystemExit):
        main(["--x"])
    with pytest.raises(ValueError):
        main(["--debug"])


def test_another_rank_alone_with_an_error_names_itself(capsys, monkeypatch):
    """Under torchrun, a rank other than 0 prints only if torchrun has not stopped it meanwhile (rank 0
    met the error too): then it met the error alone, and says so."""
    monkeypatch.delenv("LLAMA_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "OTHER_RANK_WAIT_S", 0.0)
    with pytest.raises(SystemExit) as e, cli.user_errors("prog"):
        raise torch_oom("needs 9 GiB but only 2 GiB are free")
    assert e.value.code == 1
    assert capsys.readouterr().err == "[rank 1] prog: error: needs 9 GiB but only 2 GiB are free\n"


def torch_oom(message):
    import torch

    return torch.cuda.OutOfMemoryError(message)


def test_library_callers_get_the_exception(tiny_dir):
    from device import DEVICE
    from llama import Llama

    generator = Llama.build(str(tiny_dir), None, max_seq_len=8, max_batch_size=1, device=DEVICE, dtype="float32")
    with pytest.raises(ValueError, match="more than max_seq_len=8"):
        generator.text_completion(["def fibonacci(n: int) -> int: return n if n < 2 else fib(n - 1)"])
