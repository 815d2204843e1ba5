"""Any checkpoint on any model-parallel degree: slicing shards on load, and llama.reshard."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from device import DEVICE
from llama import Llama
from llama.checkpoint import ShardReader, shard_paths
from llama.files import load_shard
from llama.loading import check_degree
from llama.model import ModelArgs
from llama.reshard import reshard

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox"]


def build(ckpt: Path, **kw) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 128, 4, device=DEVICE, dtype="float32", **kw)


def answers(generator: Llama):
    return generator.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True)


def assert_same(got, expected):
    for a, b in zip(got, expected):
        assert a["generation"] == b["generation"] and a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


@pytest.fixture(scope="module")
def full_state(tiny_step_dir):
    """The unsharded tensors of tiny_step_dir (4 heads, 4 KV heads: splits 1, 2 or 4 ways)."""
    return load_shard(tiny_step_dir / "consolidated.00.pth")


@pytest.fixture(scope="module")
def step_shards(tiny_step_dir, tmp_path_factory):
    """tiny_step_dir as 1, 2 and 4 shards."""
    root = tmp_path_factory.mktemp("step_shards")
    return {1: tiny_step_dir, **{k: reshard(str(tiny_step_dir), str(root / f"mp{k}"), k, show_progress=False) for k in (2, 4)}}


@pytest.mark.parametrize("stored", [1, 2, 4])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_reader_cuts_each_ranks_share(step_shards, full_state, stored, ranks):
    """For K stored shards and M ranks, rank r gets exactly the r-th of M equal parts of each
    split weight, and replicated weights whole."""
    for rank in range(ranks):
        reader = ShardReader(shard_paths(step_shards[stored]), rank, ranks)
        for key, full in full_state.items():
            dim = 1 if key.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
            split = key.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
                                  "wo.weight", "w2.weight", "tok_embeddings.weight"))
            expected = full.chunk(ranks, dim)[rank] if split else full
            assert reader.shape(key) == tuple(expected.shape)
            assert torch.equal(reader.read(key), expected), key


def test_reader_opens_only_the_shards_it_needs(step_shards):
    reader = ShardReader(shard_paths(step_shards[4]), 1, 2)  # rank 1 of 2 needs shards 2 and 3
    for key in reader.keys():
        reader.read(key)
    assert sorted(reader._shards) == [2, 3]
    reader = ShardReader(shard_paths(step_shards[2]), 3, 4)  # rank 3 of 4: the second half of shard 1
    for key in reader.keys():
        reader.read(key)
    assert sorted(reader._shards) == [1]


def test_reader_returns_the_mapped_tensor_when_no_copy_is_needed(step_shards):
    reader = ShardReader(shard_paths(step_shards[2]), 1, 2)
    key = "layers.0.attention.wq.weight"
    stored = reader._shard(1)[key]
    assert reader.read(key).data_ptr() == stored.data_ptr()
    assert reader.read(key, torch.float32).data_ptr() != stored.data_ptr()


def test_two_shards_on_one_process(tiny_mp2_dir, generator):
    """A 2-shard checkpoint runs in one process with the answers of the 1-shard original."""
    assert_same(answers(build(tiny_mp2_dir)), answers(generator))


def test_four_shards_on_one_process(step_shards, step_generator):
    assert_same(answers(build(step_shards[4])), answers(step_generator))


def test_reshard_round_trip_is_bit_identical(tiny_dir, tmp_path):
    two = reshard(str(tiny_dir), str(tmp_path / "two"), 2, show_progress=False)
    one = reshard(str(two), str(tmp_path / "one"), 1, show_progress=False)
    original, back = load_shard(tiny_dir / "consolidated.00.pth"), load_shard(one / "consolidated.00.pth")
    assert original.keys() == back.keys()
    for key in original:
        assert original[key].dtype == back[key].dtype and torch.equal(original[key], back[key]), key
    assert (one / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    assert (one / "params.json").read_text() == (tiny_dir / "params.json").read_text()


def test_reshard_cli(tiny_dir, tmp_path):
    """python -m llama.reshard writes the shards and a checklist that md5sum verifies."""
    run = subprocess.run([sys.executable, "-m", "llama.reshard", tiny_dir, tmp_path / "out", "--mp", "2"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=tmp_path / "out", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    again = subprocess.run([sys.executable, "-m", "llama.reshard", tiny_dir, tmp_path / "out", "--mp", "2"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "already holds" in again.stderr


def test_reshard_to_an_unsupported_degree(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"cannot be split over 4 .*n_kv_heads 2.*degrees that work: 1, 2"):
        reshard(str(tiny_dir), str(tmp_path / "x"), 4, show_progress=False)


def test_degree_check_names_working_degrees():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, multiple_of=256, ffn_dim_multiplier=1.0)
    check_degree(args, 8)
    with pytest.raises(ValueError, match="degrees that work: 1, 2, 4, 8, 16$"):
        check_degree(args, 3)
    args = ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000)  # a 34B shape
    with pytest.raises(ValueError, match="n_kv_heads 8 not divisible by 16"):
        check_degree(args, 16)


def test_reader_remaps_after_copying_enough(step_shards, full_state, monkeypatch):
    """Closing and reopening the mappings (to bound resident memory) changes nothing read."""
    monkeypatch.setattr(ShardReader, "REMAP_BYTES", 1)
    reader = ShardReader(shard_paths(step_shards[2]), 0, 1)
    for key, full in full_state.items():
        assert torch.equal(reader.read(key, torch.float32), full.float()), key
        assert not reader._shards, "closed after each copy"
