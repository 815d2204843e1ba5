"""Weights in the Hugging Face layout: loaded directly, converted both ways, checked against
transformers' own LlamaForCausalLM."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from device import DEVICE
from llama import Llama
from llama.files import load_shard
from llama.hf import HFReader, read_config
from llama.model import ModelArgs
from llama.reshard import reshard

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
TOKENS = [[1, 45, 300, 12, 77, 8, 150, 9, 260, 33], [1, 7, 7, 7, 99, 400, 2, 5, 6, 10]]
PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox"]


def build(ckpt: Path, **kw) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 128, 4, device=DEVICE, dtype="float32", **kw)


def hf_logits(folder: Path) -> torch.Tensor:
    """transformers' LlamaForCausalLM's float32 logits for TOKENS."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor(TOKENS)).logits


def test_native_hf_checkpoint_matches_transformers(native_hf_dir):
    """Names, the q/k row order and config.json are read right: logits within 1e-4 of transformers."""
    assert len(list(native_hf_dir.glob("*.safetensors"))) > 1
    ours = build(native_hf_dir).model.forward(torch.tensor(TOKENS), 0)
    torch.testing.assert_close(ours, hf_logits(native_hf_dir), atol=1e-4, rtol=0)


def test_converted_checkpoint_loads_in_transformers(hf_dir, generator):
    """llama.convert to-hf writes what LlamaForCausalLM.from_pretrained loads, with our logits."""
    ours = generator.model.forward(torch.tensor(TOKENS), 0)
    torch.testing.assert_close(ours, hf_logits(hf_dir), atol=1e-4, rtol=0)


def test_hf_layout_gives_the_consolidated_answers(hf_dir, generator):
    got = build(hf_dir).text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True)
    expected = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True)
    for a, b in zip(got, expected):
        assert a["generation"] == b["generation"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4


def test_pytorch_model_bin_layout(native_hf_dir, tmp_path):
    """Older Hugging Face checkpoints: pytorch_model.bin instead of safetensors."""
    folder = tmp_path / "bin"
    folder.mkdir()
    model = transformers.LlamaForCausalLM.from_pretrained(native_hf_dir, dtype=torch.float32)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(native_hf_dir / name, folder / name)
    ours = build(folder).model.forward(torch.tensor(TOKENS), 0)
    torch.testing.assert_close(ours, hf_logits(native_hf_dir), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mp", [1, 2])
def test_round_trip_is_bit_identical(tiny_dir, tiny_mp2_dir, hf_dir, tmp_path, mp):
    """consolidated -> Hugging Face -> consolidated gives back every weight bit for bit (as 1 shard,
    and as the 2 shards of the same weights); rope.freqs, which no model reads, has no place there."""
    back = reshard(str(hf_dir), str(tmp_path / "back"), mp, show_progress=False)
    original = tiny_dir if mp == 1 else tiny_mp2_dir
    for rank in range(mp):
        a = load_shard(original / f"consolidated.{rank:02d}.pth")
        b = load_shard(back / f"consolidated.{rank:02d}.pth")
        assert set(a) - set(b) == {"rope.freqs"} and set(b) <= set(a)
        for key in b:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # config.json has the FFN width, not the (multiple_of, multiplier) that made it: the same model
    a, b = (ModelArgs(**json.loads((d / "params.json").read_text())) for d in (tiny_dir, back))
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.norm_eps, a.rope_theta) == (
        b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.ffn_hidden_dim, b.norm_eps, b.rope_theta)


def test_convert_cli_both_ways(tiny_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "llama.convert", "to-hf", tiny_dir, tmp_path / "hf"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.model",
        "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    run = subprocess.run([sys.executable, "-m", "llama.convert", "to-meta", tmp_path / "hf", tmp_path / "meta", "--mp", "2"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "meta" / "consolidated.01.pth").is_file() and (tmp_path / "meta" / "checklist.chk").is_file()


def fails(match, folder, *args):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build(folder, *args)


def test_folder_of_neither_layout(tmp_path, tiny_dir):
    shutil.copyfile(tiny_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "notes.txt").write_text("hello")
    fails("neither a Meta checkpoint .* nor a Hugging Face one", tmp_path)


def test_unsupported_architecture(native_hf_dir, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(native_hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    fails("'gpt2' model .*only Llama models", folder)


def test_missing_shard_named_in_index(native_hf_dir, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(native_hf_dir, folder)
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    fails(f"names 1 file.*{victim.name}", folder)


def without_lm_head(src: Path, dst: Path, tie: bool) -> Path:
    """A copy of the Hugging Face checkpoint `src` without lm_head.weight, with tie_word_embeddings
    set to `tie` (how transformers saves a model whose output layer is its input embedding)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
    return dst


def test_tied_embeddings_match_transformers(native_hf_dir, tmp_path):
    """tie_word_embeddings: the output layer is the input embedding, as transformers makes it."""
    folder = without_lm_head(native_hf_dir, tmp_path / "tied", tie=True)
    ours = build(folder).model.forward(torch.tensor(TOKENS), 0)
    theirs = hf_logits(folder)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert not torch.allclose(theirs, hf_logits(native_hf_dir), atol=1e-2)  # lm_head did differ


def test_tied_output_layer_is_split_by_rows(native_hf_dir, tmp_path):
    """With 2 ranks, each reads its half of the embedding's rows as its output layer (the
    embedding itself is split by columns)."""
    folder = without_lm_head(native_hf_dir, tmp_path / "tied", tie=True)
    params = read_config(folder)
    embedding = HFReader(folder, params, 0, 1).read("tok_embeddings.weight")
    halves = [HFReader(folder, params, rank, 2).read("output.weight") for rank in range(2)]
    assert torch.equal(torch.cat(halves), embedding)


def test_untied_checkpoint_without_lm_head(native_hf_dir, tmp_path):
    fails("lacks lm_head.weight .*tie_word_embeddings is false.*download", without_lm_head(
        native_hf_dir, tmp_path / "untied", tie=False))
