"""Each example script end to end on the tiny models: plain python (MP=1) and torchrun (MP=2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from device import subprocess_env
from test_distributed import torchrun

from llama.cli import unknown_flag

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--temperature", "0", "--max_gen_len", "8"]


def python(*args, env=None) -> subprocess.CompletedProcess:
    env = subprocess_env(**(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def example(script, ckpt: Path, mp: int) -> str:
    args = [ROOT / script, "--ckpt_dir", ckpt, "--tokenizer_path", ckpt / "tokenizer.model", *FLAGS]
    run = python(*args) if mp == 1 else torchrun(*args, nproc=mp)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.parametrize(
    "script, marker",
    [
        ("example_completion.py", "> "),
        ("example_infilling.py", "================= Filled text ================="),
        ("example_instructions.py", "> Assistant: "),
    ],
)
def test_example_mp1_and_mp2(script, marker, tiny_dir, tiny_mp2_dir):
    """The example prints its answers once (rank 0 only), and MP=2 prints exactly what MP=1 does."""
    one = example(script, tiny_dir, mp=1)
    assert marker in one
    two = example(script, tiny_mp2_dir, mp=2)
    assert two == one


def test_instructions_with_70b_format(tiny_step_dir):
    out = example("example_instructions.py", tiny_step_dir, mp=1)
    assert out.count("> Assistant: ") == 3


def test_tiny_cli(tmp_path):
    """python -m llama.tiny writes Meta's layout, and its checklist verifies."""
    run = python("-m", "llama.tiny", tmp_path / "m", "--mp", "2", "--step")
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=tmp_path / "m", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("script", ["example_completion.py", "example_infilling.py", "example_instructions.py"])
def test_misspelled_flag_is_refused_before_loading(tiny_dir, script):
    run = python(ROOT / script, "--ckpt_dir", tiny_dir, "--tokenizer_path", tiny_dir / "tokenizer.model",
                 "--temprature", "0")
    assert run.returncode == 2
    assert "unknown flag --temprature; did you mean --temperature?" in run.stderr
    assert "Loaded" not in run.stderr + run.stdout  # nothing was built


def test_unknown_flag_accepts_what_fire_accepts():
    def main(ckpt_dir: str, temperature: float = 0.2, stream: bool = False):
        pass

    assert unknown_flag(main, ["--ckpt_dir", "x", "--temperature=0", "--nostream", "--stream", "--", "--help"]) is None
    assert unknown_flag(main, ["x", "--ckpt-dir", "y"]) is None  # positional values, dashes for underscores
    assert "did you mean --stream?" in unknown_flag(main, ["--steam"])
