"""User errors: each raises a real exception (never AssertionError) whose message names the problem,
and the generator keeps working afterwards."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from device import DEVICE
from llama import Llama
from llama.tiny import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROBE = ["def fib(n):"]  # greedy answer used to check the generator still works


@contextmanager
def fails(exc_type, *words):
    """Expect exc_type (not AssertionError) with every one of `words` in its message (any case)."""
    with pytest.raises(exc_type) as info:
        yield info
    assert not isinstance(info.value, AssertionError)
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in the error message: {msg}"


def greedy(gen, prompts=PROBE, max_gen_len=8):
    return [r["generation"] for r in gen.text_completion(prompts, temperature=0, max_gen_len=max_gen_len)]


@pytest.fixture(scope="module")
def baseline(generator):
    return greedy(generator)


@pytest.fixture
def still_works(generator, baseline):
    """Use in a test to check, after it, that the shared generator answers as before."""
    yield
    assert greedy(generator) == baseline


def build(ckpt_dir, tokenizer_path=None, **kw):
    kw = {"max_seq_len": 64, "max_batch_size": 2, "device": DEVICE, "dtype": "float32", **kw}
    tokenizer_path = Path(ckpt_dir) / "tokenizer.model" if tokenizer_path is None else tokenizer_path
    return Llama.build(str(ckpt_dir), str(tokenizer_path), **kw)


@pytest.fixture
def copy_dir(tiny_dir, tmp_path):
    """A private copy of tiny_dir to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


@pytest.fixture
def copy_mp2_dir(tiny_mp2_dir, tmp_path):
    """A private copy of tiny_mp2_dir (two shards, with their checklist.chk) to damage."""
    return Path(shutil.copytree(tiny_mp2_dir, tmp_path / "ckpt_mp2"))


def edit_shard(path, **changes):
    """Rewrite the shard at `path` with some tensors replaced (None: removed)."""
    state = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, path)


class NotATensor:
    """A pickled object that a checkpoint must not hold."""


class RunsCode:
    """Unpickling it creates a file: what a malicious checkpoint does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def edit_params(folder, **changes):
    path = folder / "params.json"
    params = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del params[key]
        else:
            params[key] = value
    path.write_text(json.dumps(params))


# Build errors --------------------------------------------------------------------------------


def test_build_missing_ckpt_dir(tiny_dir, tmp_path):
    missing = tmp_path / "CodeLlama-7b"
    with fails(FileNotFoundError, str(missing), "not found"):
        build(missing, tiny_dir / "tokenizer.model")


def test_build_ckpt_dir_is_a_file(tiny_dir):
    with fails(FileNotFoundError, "params.json", "file", "folder"):
        build(tiny_dir / "params.json", tiny_dir / "tokenizer.model")


def test_build_empty_ckpt_dir(tiny_dir, tmp_path):
    with fails(FileNotFoundError, "consolidated", str(tmp_path)):
        build(tmp_path, tiny_dir / "tokenizer.model")


def test_build_truncated_shard(copy_dir):
    shard = copy_dir / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with fails(ValueError, "consolidated.00.pth", "download it again"):
        build(copy_dir)


def test_build_html_page_as_shard(copy_dir):
    (copy_dir / "consolidated.00.pth").write_text(
        "<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>Access denied</body></html>\n"
    )
    with fails(ValueError, "consolidated.00.pth", "download it again"):
        build(copy_dir)


def test_build_missing_params(copy_dir):
    (copy_dir / "params.json").unlink()
    with fails(FileNotFoundError, "params.json", "missing"):
        build(copy_dir)


def test_build_params_not_json(copy_dir):
    (copy_dir / "params.json").write_text('{"dim": 64, "n_layers": ')
    with fails(ValueError, "params.json", "json"):
        build(copy_dir)


def test_build_params_without_dim(copy_dir):
    edit_params(copy_dir, dim=None)
    with fails(ValueError, "params.json", "'dim'"):
        build(copy_dir)


def test_build_params_of_another_model(copy_dir):
    """n_layers=3 against a 2-layer checkpoint: weights are missing."""
    edit_params(copy_dir, n_layers=3)
    with fails(ValueError, "params.json", "layers.2"):
        build(copy_dir)


def test_build_params_with_other_width(copy_dir):
    """dim=128 against a dim=64 checkpoint: shapes differ."""
    edit_params(copy_dir, dim=128)
    with fails(ValueError, "params.json", "shape"):
        build(copy_dir)


def test_build_missing_tokenizer(copy_dir):
    (copy_dir / "tokenizer.model").unlink()
    with fails(FileNotFoundError, "tokenizer.model"):
        build(copy_dir)


def test_build_tokenizer_of_another_model(copy_dir):
    other = copy_dir / "other_tokenizer.model"
    train_tokenizer(other, vocab_size=400)
    with fails(ValueError, "tokenizer", "vocabulary"):
        build(copy_dir, other)


def test_build_missing_ckpt_dir_and_tokenizer(tmp_path):
    """The folder is named as missing, not its tokenizer.model."""
    missing = tmp_path / "CodeLlama-7b"
    with fails(FileNotFoundError, "checkpoint folder not found", str(missing)):
        build(missing, missing / "tokenizer.model")


def test_build_params_with_fewer_layers(copy_dir):
    """n_layers=1 against a 2-layer checkpoint: the second layer's 9 weights would be dropped."""
    edit_params(copy_dir, n_layers=1)
    with fails(ValueError, "9 weight(s)", "does not use", "layers.1.", "params.json"):
        build(copy_dir)


def test_build_hf_config_with_fewer_layers(hf_dir, tmp_path):
    folder = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with fails(ValueError, "9 weight(s)", "does not use", "layers.1."):
        build(folder)


def add_hf_tensor(folder, name):
    """Add one tensor `name` to the Hugging Face checkpoint in `folder`, in a file of its own."""
    save_file({name: torch.zeros(4)}, str(folder / "extra.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "extra.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_build_hf_tensor_of_no_llama(hf_dir, tmp_path):
    folder = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    add_hf_tensor(folder, "model.layers.0.self_attn.q_proj.lora_A.weight")
    with fails(ValueError, "1 tensor(s)", "not part of a Llama model", "lora_A"):
        build(folder)


def test_build_hf_rotary_buffers_are_allowed(hf_dir, tmp_path):
    """Older Hugging Face checkpoints carry rotary_emb.inv_freq, which no model reads (as Meta's
    carry rope.freqs, which tiny_dir has)."""
    folder = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    add_hf_tensor(folder, "model.layers.0.self_attn.rotary_emb.inv_freq")
    assert greedy(build(folder)) == greedy(build(hf_dir))


def test_build_missing_shard_listed_in_checklist(copy_mp2_dir):
    """Reported as missing, not as shapes that params.json does not describe."""
    (copy_mp2_dir / "consolidated.01.pth").unlink()
    with fails(FileNotFoundError, "consolidated.01.pth is missing", "checklist.chk", "download"):
        build(copy_mp2_dir)


def test_build_missing_shard_without_checklist(copy_mp2_dir):
    """Without checklist.chk the embedding's width tells how many shards the checkpoint has."""
    (copy_mp2_dir / "consolidated.01.pth").unlink()
    (copy_mp2_dir / "checklist.chk").unlink()
    with fails(FileNotFoundError, "consolidated.01.pth is missing", "split into 2 shards"):
        build(copy_mp2_dir)


def test_build_gap_in_shard_numbers(copy_mp2_dir):
    """consolidated.00.pth and .02.pth (01 missing) must not load as a 2-shard checkpoint."""
    (copy_mp2_dir / "consolidated.01.pth").rename(copy_mp2_dir / "consolidated.02.pth")
    (copy_mp2_dir / "checklist.chk").unlink()
    with fails(FileNotFoundError, "consolidated.01.pth is missing", "3 shards"):
        build(copy_mp2_dir)


def test_build_pth_file_that_is_no_shard(copy_dir):
    shutil.copyfile(copy_dir / "consolidated.00.pth", copy_dir / "consolidated.00 (1).pth")
    with fails(ValueError, "'consolidated.00 (1).pth'", "not a shard name", "move it out"):
        build(copy_dir)


def test_build_shard_not_in_checklist(copy_dir):
    shutil.copyfile(copy_dir / "consolidated.00.pth", copy_dir / "consolidated.01.pth")
    with fails(ValueError, "consolidated.01.pth", "not in its checklist.chk"):
        build(copy_dir)


def test_build_shards_holding_different_tensors(copy_mp2_dir):
    edit_shard(copy_mp2_dir / "consolidated.01.pth", **{"layers.1.ffn_norm.weight": None})
    with fails(ValueError, "consolidated.01.pth", "different tensors"):
        build(copy_mp2_dir)


@pytest.mark.parametrize("obj", [NotATensor(), "runs code"])
def test_build_shard_with_pickled_objects(copy_dir, obj):
    """Refused (never run) and named as such, not as a damaged download."""
    marker = copy_dir / "ran.txt"
    obj = RunsCode(marker) if obj == "runs code" else obj
    edit_shard(copy_dir / "consolidated.00.pth", **{"x": obj})
    with fails(ValueError, "consolidated.00.pth", "holds objects other than tensors",
               "refusing to run code from a checkpoint") as info:
        build(copy_dir)
    assert "corrupt" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "html"])
def test_build_damaged_shard_is_not_called_unsafe(copy_dir, damage):
    shard = copy_dir / "consolidated.00.pth"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:5000])
    else:
        shard.write_text("<!DOCTYPE html><html><body>Access denied</body></html>\n")
    with fails(ValueError, "incomplete or corrupt", "download it again") as info:
        build(copy_dir)
    assert "other than tensors" not in str(info.value)


def test_build_training_checkpoint_with_nested_state(copy_dir):
    shard = copy_dir / "consolidated.00.pth"
    torch.save({"model": torch.load(shard, weights_only=True), "step": 1000}, shard)
    with fails(ValueError, "'model', a dict", "flat state dict of tensors"):
        build(copy_dir)


def test_build_integer_weights(copy_dir):
    shard = copy_dir / "consolidated.00.pth"
    wq = torch.load(shard, weights_only=True)["layers.0.attention.wq.weight"]
    edit_shard(shard, **{"layers.0.attention.wq.weight": wq.round().to(torch.int64)})
    with fails(ValueError, "layers.0.attention.wq.weight", "torch.int64", "not floating point"):
        build(copy_dir)


def test_build_integer_weights_in_one_shard(copy_mp2_dir):
    shard = copy_mp2_dir / "consolidated.01.pth"
    wq = torch.load(shard, weights_only=True)["layers.0.attention.wq.weight"]
    edit_shard(shard, **{"layers.0.attention.wq.weight": wq.to(torch.int64)})
    with fails(ValueError, "layers.0.attention.wq.weight", "torch.int64", "do not match"):
        build(copy_mp2_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "all nan"])
def test_build_non_finite_weights(copy_dir, bad):
    """Found by Llama.build(check_weights=True), which names the tensor."""
    shard = copy_dir / "consolidated.00.pth"
    w2 = torch.load(shard, weights_only=True)["layers.1.feed_forward.w2.weight"].clone()
    if bad == "all nan":
        w2.fill_(float("nan"))
    else:
        w2[3, 5] = bad
    edit_shard(shard, **{"layers.1.feed_forward.w2.weight": w2})
    with fails(ValueError, "layers.1.feed_forward.w2.weight", "NaN or infinite", "download them again"):
        build(copy_dir, check_weights=True)


def test_build_weights_beyond_float16s_range(copy_dir):
    shard = copy_dir / "consolidated.00.pth"
    norm = torch.load(shard, weights_only=True)["norm.weight"].clone()
    norm[0] = 1e6  # a bfloat16 that float16 cannot hold
    edit_shard(shard, **{"norm.weight": norm})
    build(copy_dir, dtype="bfloat16", check_weights=True)
    with fails(ValueError, "norm.weight", "float16", "exceed", "bfloat16 or float32"):
        build(copy_dir, dtype="float16", check_weights=True)


def test_build_model_parallel_size_not_dividing_world(tiny_dir):
    with fails(ValueError, "model_parallel_size=3", "processes"):
        build(tiny_dir, model_parallel_size=3)


@pytest.mark.parametrize("kw,word", [
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"max_seq_len": -5}, "max_seq_len"),
    ({"max_batch_size": -1}, "max_batch_size"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_seq_len": 64.0}, "max_seq_len"),
])
def test_build_bad_limits(tiny_dir, kw, word):
    with fails(ValueError, word):
        build(tiny_dir, **kw)


def test_build_unsupported_dtype(tiny_dir):
    with fails(ValueError, "dtype", "int8"):
        build(tiny_dir, dtype="int8")


def test_build_twice_in_one_process(tiny_dir, generator):
    """Two builds (after the failed ones above) give working, identical generators."""
    a, b = build(tiny_dir, max_seq_len=128), build(tiny_dir, max_seq_len=128)
    assert greedy(a) == greedy(b) == greedy(generator)


# Request errors ------------------------------------------------------------------------------


def test_prompt_longer_than_max_seq_len(generator, still_works):
    with fails(ValueError, "max_seq_len=128"):
        generator.text_completion(["word " * 300], temperature=0)


def test_prompt_tokens_longer_than_max_seq_len(generator, still_works):
    with fails(ValueError, "max_seq_len"):
        generator.generate([[1] * 129], max_gen_len=4)


def test_non_string_prompt(generator, still_works):
    with fails(TypeError, "prompts[0]", "str"):
        generator.text_completion([[1, 2]])


def test_single_string_instead_of_list(generator, still_works):
    with fails(TypeError, "list"):
        generator.text_completion("def fib(n):")


def test_single_string_infilling(generator, still_works):
    with fails(TypeError, "list"):
        generator.text_infilling("def f(", ["):"])


@pytest.mark.parametrize("temperature", [-0.1, -1, float("nan")])
def test_negative_temperature(generator, still_works, temperature):
    with fails(ValueError, "temperature"):
        generator.text_completion(["a"], temperature=temperature)


@pytest.mark.parametrize("top_p", [0, 0.0, 1.5, -0.2])
def test_top_p_out_of_range(generator, still_works, top_p):
    with fails(ValueError, "top_p"):
        generator.text_completion(["a"], top_p=top_p)


@pytest.mark.parametrize("dialog,words", [
    ([{"role": "bot", "content": "hi"}], ["role", "'bot'"]),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ["'assistant'"]),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], ["last", "'user'"]),
    ([{"role": "system", "content": "s"}], ["'user'"]),
    ([], ["empty"]),
])
def test_bad_dialog(generator, still_works, dialog, words):
    with fails(ValueError, *words):
        generator.chat_completion([dialog], temperature=0)


def test_bad_dialog_is_named_by_index(generator, still_works):
    good = [{"role": "user", "content": "hi"}]
    with fails(ValueError, "dialog 1"):
        generator.chat_completion([good, []], temperature=0)


def test_single_dialog_instead_of_list(generator, still_works):
    with fails(TypeError, "dialog 0", "list"):
        generator.chat_completion([{"role": "user", "content": "hi"}])


def test_infilling_without_infilling_pieces(step_generator):
    with fails(ValueError, "infilling pieces"):
        step_generator.text_infilling(["def f("], ["):"])


def test_prefixes_and_suffixes_of_different_lengths(generator, still_works):
    with fails(ValueError, "prefixes", "suffixes"):
        generator.text_infilling(["a", "b"], ["c"])


@pytest.mark.parametrize("max_gen_len", [-1, 2.5, "8"])
def test_bad_max_gen_len(generator, still_works, max_gen_len):
    with fails(ValueError, "max_gen_len"):
        generator.text_completion(["a"], max_gen_len=max_gen_len)


def test_generate_empty_token_list(generator, still_works):
    with fails(ValueError, "prompt 0", "empty"):
        generator.generate([[]], max_gen_len=4)


@pytest.mark.parametrize("offset", [-1, 0, 10**6])
def test_generate_out_of_vocabulary_ids(generator, still_works, offset):
    """Ids -1, n_words and n_words + 10**6."""
    n_words = generator.tokenizer.n_words
    bad_id = -1 if offset == -1 else n_words + offset
    with fails(ValueError, "prompt 1", "vocabulary", str(bad_id)):
        generator.generate([[1, 5], [1, bad_id]], max_gen_len=4)


def test_generate_non_int_ids(generator, still_works):
    with fails(TypeError, "prompt 0"):
        generator.generate([[1, 2.5]], max_gen_len=4)


# Behaviour at the edges ------------------------------------------------------------------------


def test_empty_request_lists(generator, still_works):
    assert generator.text_completion([]) == []
    assert generator.text_infilling([], []) == []
    assert generator.chat_completion([]) == []
    assert generator.generate([], max_gen_len=4) == ([], None)


def test_max_gen_len_zero(generator, still_works):
    assert generator.text_completion(["a", "def f"], max_gen_len=0) == [{"generation": ""}] * 2
    assert generator.generate([[1, 5]], max_gen_len=0) == ([[]], None)
    assert generator.text_infilling(["a"], ["b"], max_gen_len=0)[0]["generation"] == ""


def test_more_prompts_than_max_batch_size(generator, still_works):
    """9 prompts of different lengths on max_batch_size=4: same greedy answers as one by one."""
    assert generator.model.params.max_batch_size == 4
    prompts = [f"p{i} = " + "x " * i for i in range(9)]
    batched = greedy(generator, prompts)
    assert batched == [greedy(generator, [p])[0] for p in prompts]


def test_full_length_prompt_batched_with_short_one(generator):
    full = [1] + [100] * 127  # exactly max_seq_len=128 tokens: nothing left to generate
    short = [1, 5]
    one_by_one = [generator.generate([p], max_gen_len=4, temperature=0)[0][0] for p in (full, short)]
    assert generator.generate([full, short], max_gen_len=4, temperature=0)[0] == one_by_one


def test_prompts_of_different_lengths_up_to_max_seq_len(generator, still_works):
    """The longer row reaches max_seq_len while the shorter one still generates (stop_token=-1
    never matches, so both run to the end)."""
    prompts = [[1, 5], [1] + [100] * 20]
    one_by_one = [generator.generate([p], max_gen_len=127, temperature=0, stop_token=-1)[0][0] for p in prompts]
    assert generator.generate(prompts, max_gen_len=127, temperature=0, stop_token=-1)[0] == one_by_one


def test_generator_still_works_after_errors(generator, baseline):
    """Runs after the error tests above (file order) and the crashes of the xfailed ones."""
    assert greedy(generator) == baseline


# No assert statements: `python -O` keeps every check ---------------------------------------------


def test_checks_survive_python_O(tiny_dir):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        assert False, "asserts are on"  # skipped under -O
        from llama import Llama
        d = {str(tiny_dir)!r}

        def attempt(name, f):
            try:
                f()
                print(name, "NO ERROR")
            except AssertionError as e:
                print(name, "ASSERTION", e)
            except Exception as e:
                print(name, type(e).__name__, e)

        attempt("seq", lambda: Llama.build(d, d + "/tokenizer.model", 0, 2, device="cpu"))
        g = Llama.build(d, d + "/tokenizer.model", 32, 2, device="cpu", dtype="float32")
        attempt("long", lambda: g.text_completion(["word " * 100]))
        attempt("temp", lambda: g.text_completion(["a"], temperature=-1))
        attempt("dialog", lambda: g.chat_completion([[{{"role": "assistant", "content": "a"}}]]))
        attempt("oov", lambda: g.generate([[1, 10**6]], max_gen_len=2))
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["seq"].startswith("ValueError") and "max_seq_len" in lines["seq"]
    assert lines["long"].startswith("ValueError") and "max_seq_len" in lines["long"]
    assert lines["temp"].startswith("ValueError") and "temperature" in lines["temp"]
    assert lines["dialog"].startswith("ValueError") and "'user'" in lines["dialog"]
    assert lines["oov"].startswith("ValueError") and "vocabulary" in lines["oov"]
