"""Model parallelism for real: two processes under torchrun (gloo, CPU) against one process, for
checkpoints of 2 shards, of 1 shard (split on load), and resharded with llama.reshard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from device import DEVICE, need_processes, subprocess_env
import mp_requests
from llama.reshard import reshard

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    """torchrun --standalone picks a free port, so back-to-back runs never collide."""
    need_processes(nproc)
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def resharded_dir(tiny_dir, tmp_path_factory):
    """tiny_dir (1 shard) rewritten as 2 shards by python -m llama.reshard's code."""
    return reshard(str(tiny_dir), str(tmp_path_factory.mktemp("resharded") / "tiny_resharded"), 2, show_progress=False)


@pytest.fixture(scope="module")
def mp2_answers(tiny_mp2_dir, tiny_step_mp2_dir, tiny_dir, tiny_step_dir, resharded_dir, hf_dir, native_hf_dir,
                tmp_path_factory):
    """Answers of every rank of one torchrun run over seven checkpoints (both chat formats; 2 shards,
    1 shard, a resharded copy, Hugging Face layouts converted and native, on 2 processes)."""
    out = tmp_path_factory.mktemp("mp2")
    ckpts = {"mp2": tiny_mp2_dir, "step_mp2": tiny_step_mp2_dir, "mp1": tiny_dir, "step_mp1": tiny_step_dir,
             "resharded": resharded_dir, "hf": hf_dir, "native_hf": native_hf_dir}
    run = torchrun(ROOT / "tests" / "mp_requests.py", out, *(f"{k}={v}" for k, v in ckpts.items()))
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def mp1_answers(tiny_dir, tiny_step_dir):
    """One process, one shard: the expected answers."""
    answers = {**mp_requests.answers(str(tiny_dir)), **mp_requests.answers(str(tiny_step_dir))}
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


def logprobs_of(answers, inside=False):
    """Every float under a "logprobs" key, flattened."""
    if isinstance(answers, dict):
        return [x for k, v in answers.items() for x in logprobs_of(v, inside or k == "logprobs")]
    if isinstance(answers, list):
        return [x for v in answers for x in logprobs_of(v, inside)]
    return [answers] if inside else []


def assert_same_answers(got, expected):
    """Same tokens and texts; log-probabilities within 1e-3."""
    assert strip_logprobs(got) == strip_logprobs(expected)
    lp1, lp2 = logprobs_of(expected), logprobs_of(got)
    assert len(lp1) == len(lp2)
    assert all(abs(a - b) < 1e-3 for a, b in zip(lp1, lp2))


CASES = [
    ("mp2", "completion"), ("mp2", "sampled"), ("mp2", "infill"), ("mp2", "infill_spm"), ("mp2", "chat"),
    ("mp2", "echo"), ("step_mp2", "chat70b"),
    ("mp1", "completion"), ("mp1", "infill"), ("mp1", "chat"), ("step_mp1", "chat70b"),
    ("resharded", "completion"), ("resharded", "infill"),
    ("mp2", "stream"), ("mp2", "infill_stream"), ("step_mp2", "chat70b_stream"), ("mp2", "chunked"),
    ("hf", "completion"), ("hf", "infill"), ("hf", "chat"),
]


@pytest.mark.parametrize("ckpt, request_name", CASES)
def test_mp2_equals_mp1(mp1_answers, mp2_answers, ckpt, request_name):
    """Greedy (and seeded sampled) answers on 2 processes equal one process on the same weights,
    whatever the checkpoint's number of shards."""
    assert_same_answers(mp2_answers[0][ckpt][request_name], mp1_answers[request_name])


def test_unsupported_degree_under_torchrun(tiny_dir, tmp_path):
    """Three processes cannot split 4 heads / 2 KV heads: a clear error on every rank, no hang."""
    script = tmp_path / "build.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from llama import Llama\n"
        f"Llama.build({str(tiny_dir)!r}, {str(tiny_dir / 'tokenizer.model')!r}, 32, 1, device={DEVICE!r})\n"
    )
    run = torchrun(script, nproc=3, timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("cannot be split over 3 model-parallel processes") == 3
    assert "degrees that work: 1, 2" in run.stderr


def test_streams_join_to_the_answers(mp2_answers):
    """Under torchrun every rank iterates the stream; the pieces join to the non-streamed text."""
    for answers in mp2_answers:
        mp2, step = answers["mp2"], answers["step_mp2"]
        assert "".join(mp2["stream"]) == mp2["completion"][0]["generation"]
        assert "".join(mp2["infill_stream"]) == mp2["infill"][0]["generation"]
        assert "".join(step["chat70b_stream"]) == step["chat70b"][0]["generation"]["content"]


def test_mp2_hf_layout_matches_transformers(mp2_answers, native_hf_dir):
    """A checkpoint written by transformers, split over 2 processes on load: logits within 1e-4 of
    LlamaForCausalLM's."""
    from test_hf import hf_logits

    logits = torch.tensor(mp2_answers[0]["native_hf"]["logits"])
    torch.testing.assert_close(logits, hf_logits(native_hf_dir), atol=1e-4, rtol=0)
