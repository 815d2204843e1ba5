"""Session-wide tiny models in Meta's layout, built once per test run."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.tiny import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A Code Llama 7B-like tiny model (infilling pieces, grouped-query attention), one shard."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_mp1"), mp=1)


@pytest.fixture(scope="session")
def tiny_mp2_dir(tmp_path_factory) -> Path:
    """The same weights and tokenizer as tiny_dir, split into two model-parallel shards."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_mp2"), mp=2)


@pytest.fixture(scope="session")
def tiny_step_dir(tmp_path_factory) -> Path:
    """A 70B-Instruct-like tiny model: a <step> piece, no infilling pieces, multi-head attention."""
    return write_tiny_model(
        tmp_path_factory.mktemp("tiny_step"), mp=1, step=True, infill=False, n_kv_heads=4, seed=1
    )


@pytest.fixture(scope="session")
def tiny_step_mp2_dir(tmp_path_factory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("tiny_step_mp2"), mp=2, step=True, infill=False, n_kv_heads=4, seed=1
    )


@pytest.fixture(scope="session")
def generator(tiny_dir):
    """A float32 CPU generator on tiny_dir, shared by tests that do not change it."""
    from llama import Llama

    return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), max_seq_len=128, max_batch_size=4,
                       device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def step_generator(tiny_step_dir):
    from llama import Llama

    return Llama.build(str(tiny_step_dir), str(tiny_step_dir / "tokenizer.model"), max_seq_len=128,
                       max_batch_size=4, device="cpu", dtype="float32")
