"""Model parallelism for real: two processes under torchrun (gloo, CPU) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mp_requests
from llama import Llama

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    """torchrun --standalone picks a free port, so back-to-back runs never collide."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mp2_answers(tiny_mp2_dir, tiny_step_mp2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp2")
    run = torchrun(ROOT / "tests" / "mp_requests.py", tiny_mp2_dir, tiny_step_mp2_dir, out)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def mp1_answers(tiny_dir, tiny_step_dir):
    answers = mp_requests.requests(mp_requests.build(str(tiny_dir)))
    answers.update(mp_requests.step_requests(mp_requests.build(str(tiny_step_dir))))
    return json.loads(json.dumps(answers))  # tuples -> lists, as read back from the files


def test_ranks_agree(mp2_answers):
    """Every rank samples the same tokens (same seed, same gathered logits)."""
    assert mp2_answers[0] == mp2_answers[1]


def strip_logprobs(answers):
    if isinstance(answers, dict):
        return {k: strip_logprobs(v) for k, v in answers.items() if k != "logprobs"}
    if isinstance(answers, list):
        return [strip_logprobs(v) for v in answers]
    return answers


def logprobs_of(answers):
    if isinstance(answers, dict):
        return [x for k, v in answers.items() for x in (v if k == "logprobs" else logprobs_of(v))]
    if isinstance(answers, list):
        return [x for v in answers for x in logprobs_of(v)]
    return []


@pytest.mark.parametrize("request_name", ["completion", "sampled", "infill", "infill_spm", "chat", "chat70b"])
def test_mp2_equals_mp1(mp1_answers, mp2_answers, request_name):
    """Greedy (and seeded sampled) answers of MP=2 equal MP=1 on the same weights; log-probabilities
    agree within 1e-3."""
    one, two = mp1_answers[request_name], mp2_answers[0][request_name]
    assert strip_logprobs(two) == strip_logprobs(one)
    lp1, lp2 = logprobs_of(one), logprobs_of(two)
    assert len(lp1) == len(lp2)
    assert all(abs(a - b) < 1e-3 for a, b in zip(lp1, lp2))


def test_mp2_echo(mp1_answers, mp2_answers):
    (tok1, lp1), (tok2, lp2) = mp1_answers["echo"], mp2_answers[0]["echo"]
    assert tok1 == tok2
    assert all(abs(a - b) < 1e-3 for a, b in zip(lp1[0], lp2[0]))


def test_mp_mismatch_under_torchrun(tiny_dir, tmp_path):
    """A one-shard checkpoint on two processes fails with a message, on every rank, without hanging."""
    script = tmp_path / "build.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from llama import Llama\n"
        f"Llama.build({str(tiny_dir)!r}, {str(tiny_dir / 'tokenizer.model')!r}, 32, 1, device='cpu')\n"
    )
    run = torchrun(script, timeout=120)
    assert run.returncode != 0
    assert "--nproc_per_node 1" in run.stderr


def test_single_process_needs_no_launcher(tiny_dir, generator):
    """Plain `python` works: Llama.build makes a one-process group itself."""
    assert isinstance(generator, Llama)
    assert generator.text_completion(["x"], temperature=0, max_gen_len=2)[0]["generation"]
