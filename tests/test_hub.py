"""Hugging Face hub ids as checkpoints (llama/hub.py), offline: no network is used. A cache folder is
built in huggingface_hub's own layout (models--owner--name/refs/main holding a commit hash,
snapshots/<hash>/<files>) and the library is pointed at it with HF_HUB_CACHE and HF_HUB_OFFLINE=1,
in a subprocess, as a user's environment would (huggingface_hub reads them when imported)."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device import DEVICE, subprocess_env
from llama import hub
from llama.checks import MissingExtra
from llama.gguf_export import write_gguf

pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "89abcdef0123456789abcdef0123456789abcdef"


def cache_repo(cache: Path, repo: str, commit: str, files, refs=("main",)) -> Path:
    """Put `files` into the cache as the snapshot `commit` of `repo`, which `refs` point at."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, snapshot / Path(f).name)
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tmp_path_factory) -> Path:
    """owner/tiny (the tiny model in Meta's layout: main, and tag v1 at another commit) and
    owner/tiny-gguf (two GGUF files of it) in a cache folder."""
    cache = tmp_path_factory.mktemp("hf_cache")
    files = [tiny_dir / n for n in ("params.json", "consolidated.00.pth", "tokenizer.model")]
    cache_repo(cache, "owner/tiny", COMMIT, files)
    cache_repo(cache, "owner/tiny", TAGGED, files, refs=("v1",))
    ggufs = tmp_path_factory.mktemp("ggufs")
    write_gguf(str(tiny_dir), str(ggufs / "tiny-f32.gguf"), "f32", show_progress=False)
    write_gguf(str(tiny_dir), str(ggufs / "tiny-q8_0.gguf"), "q8_0", show_progress=False)
    cache_repo(cache, "owner/tiny-gguf", COMMIT, sorted(ggufs.iterdir()))
    return cache


SCRIPT = textwrap.dedent("""
    import json, sys
    from llama import Llama

    def answer(ckpt_dir):
        try:
            g = Llama.build(ckpt_dir, None, max_seq_len=64, max_batch_size=2, device=DEVICE, dtype="float32")
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        prompts = ["def fib(n):", "import os\\n    x = 'é'"]
        return [r["generation"] for r in g.text_completion(prompts, temperature=0, max_gen_len=6)]

    print(json.dumps({c: answer(c) for c in sys.argv[1:]}))
""")


def build_answers(cache: Path, *ckpts: str) -> dict:
    """{ckpt: greedy answers, or the error} from Llama.build (tokenizer_path=None) in a subprocess
    whose huggingface_hub is offline, on the cache folder `cache`."""
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"),
                         PYTHONPATH=str(ROOT))
    env.pop("HF_TOKEN", None)
    code = f"DEVICE = {DEVICE!r}\n" + SCRIPT
    run = subprocess.run([sys.executable, "-c", code, *ckpts], cwd=cache, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hub_ids_load_from_the_cache_offline(hub_cache, tiny_dir):
    """A hub id (and id@tag, id@commit) builds from the cache with the tokenizer it carries, and
    answers as the folder does; a GGUF file is picked with owner/name/FILE.gguf."""
    gguf = next((hub_cache / "models--owner--tiny-gguf" / "snapshots" / COMMIT).glob("*f32.gguf"))
    got = build_answers(hub_cache, str(tiny_dir), "owner/tiny", "owner/tiny@v1", f"owner/tiny@{COMMIT}",
                        str(gguf), "owner/tiny-gguf/tiny-f32.gguf")
    expected = got[str(tiny_dir)]
    assert isinstance(expected, list), expected
    assert got["owner/tiny"] == got["owner/tiny@v1"] == got[f"owner/tiny@{COMMIT}"] == expected
    assert got["owner/tiny-gguf/tiny-f32.gguf"] == got[str(gguf)]


def test_uncached_hub_id_offline_is_a_clear_error(hub_cache):
    got = build_answers(hub_cache, "owner/missing", "owner/tiny@v2", "owner/tiny-gguf/other.gguf")
    for ckpt in ("owner/missing", "owner/tiny@v2"):
        message = got[ckpt]
        assert message.startswith("FileNotFoundError: "), message
        for words in (repr(ckpt), str(hub_cache), "HF_HUB_OFFLINE", "hf download", "HF_HUB_CACHE"):
            assert words in message, (words, message)
    assert "hf download owner/tiny --revision v2" in got["owner/tiny@v2"]
    assert got["owner/tiny-gguf/other.gguf"].startswith("FileNotFoundError: 'owner/tiny-gguf/other.gguf'")


def test_hub_id_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse("codellama/CodeLlama-7b-hf") == hub.HubId("codellama/CodeLlama-7b-hf")
    assert hub.parse("codellama/CodeLlama-7b-hf@refs/pr/1") == hub.HubId("codellama/CodeLlama-7b-hf", None, "refs/pr/1")
    assert hub.parse("TheBloke/X-GGUF/x.Q4_K_M.gguf@main") == hub.HubId("TheBloke/X-GGUF", "x.Q4_K_M.gguf", "main")
    for local in ("CodeLlama-7b", "CodeLlama-7b/", "./a/b", "/abs/a", "~/a", "a/b/c", "a--b/c", "a/b/c.pth", "a\\b",
                  "CodeLlama-7b/consolidated.00.pth", "CodeLlama-7b/params.json", "x/model.gguf"):
        assert hub.parse(local) is None, local
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub.parse("owner/name") is None  # an existing folder is always local
    assert hub.resolve("owner/name") == "owner/name"


def test_checkpoint_files_are_what_the_layout_needs():
    hf = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
          "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
          "original/consolidated.00.pth", "original/params.json"]
    assert sorted(hub.checkpoint_files(hub.HubId("o/n"), hf)) == sorted(
        [n for n in hf if "pytorch_model" not in n and n != "README.md" and not n.startswith("original/")])
    assert hub.checkpoint_files(hub.HubId("o/n"), hf, weights=False) == [
        "config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"]
    meta = ["params.json", "consolidated.00.pth", "consolidated.01.pth", "tokenizer.model", "checklist.chk"]
    assert hub.checkpoint_files(hub.HubId("o/n"), meta) == ["params.json", "consolidated.00.pth",
                                                           "consolidated.01.pth", "tokenizer.model"]
    assert hub.checkpoint_files(hub.HubId("o/n"), ["config.json", "a.Q8_0.gguf"]) == ["a.Q8_0.gguf"]
    with pytest.raises(ValueError, match=r"holds 2 GGUF files .*name the one to load, e.g. o/n/a.Q4_0.gguf"):
        hub.checkpoint_files(hub.HubId("o/n"), ["a.Q8_0.gguf", "a.Q4_0.gguf"])
    assert hub.checkpoint_files(hub.HubId("o/n", "a.Q4_0.gguf"), ["a.Q8_0.gguf", "a.Q4_0.gguf"]) == ["a.Q4_0.gguf"]
    with pytest.raises(FileNotFoundError, match="no file 'b.gguf' .*a.Q8_0.gguf"):
        hub.checkpoint_files(hub.HubId("o/n", "b.gguf"), ["a.Q8_0.gguf"])
    with pytest.raises(ValueError, match="holds no checkpoint this package loads"):
        hub.checkpoint_files(hub.HubId("o/n"), ["README.md", "model.onnx"])


def test_hub_id_without_huggingface_hub_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when it is not installed
    expected = r"'owner/name' is not a local file or folder.*pip install 'codellama\[hub\]'"
    with pytest.raises(MissingExtra, match=expected):
        hub.resolve("owner/name")


def test_memory_estimate_of_a_hub_id(hub_cache, tiny_dir, monkeypatch):
    """python -m llama.memory's estimate reads a hub id's params.json from the cache (in-process:
    huggingface_hub's settings, read from the environment at its import, are set directly)."""
    from huggingface_hub import constants

    from llama.memory import estimate

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    assert estimate("owner/tiny", 4096, 2, 2, "bfloat16") == estimate(str(tiny_dir), 4096, 2, 2, "bfloat16")
