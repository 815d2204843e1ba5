"""GGUF files (llama.cpp's format): SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32, tied embeddings)
against transformers' own reading of the same file, split over 3 processes, tiny GGUFs written
here from the tiny Meta checkpoint, and files the loader must refuse."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from device import DEVICE, need_processes, subprocess_env
from llama import Llama, distributed
from llama.files import load_shard
from llama.gguf import GGUFWeightReader, gguf_name
from llama.loading import Placement, load_model
from llama.memory import estimate
from llama.model import ModelArgs
from llama.parallel import shard_dim

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_VOCAB = 49152
TOKENS = [[1, 504, 3458, 282, 4193, 314, 253, 1345, 30, 198], [28, 9, 600, 12000, 45000, 7, 7, 7, 2, 40]]
DEV = torch.device(DEVICE)


def load(path, vocab_size=SMOLLM2_VOCAB):
    """A float32 model (on the test device) on one process, as Llama.build makes it (without the tokenizer)."""
    distributed.setup_model_parallel(1, DEV)
    return load_model(str(path), vocab_size, 64, 2, Placement(0, 1, torch.float32, DEV), show_progress=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Llama:
    """SmolLM2 built from the file alone (its vocabulary too), float32 on the test device, one process."""
    return Llama.build(str(smollm2_gguf), max_seq_len=64, max_batch_size=2, device=DEVICE, dtype="float32")


@pytest.fixture(scope="module")
def smollm2_logits(smollm2):
    """Our logits for TOKENS."""
    with torch.inference_mode():
        return smollm2.model.forward(torch.tensor(TOKENS), 0)


@pytest.fixture(scope="module")
def transformers_model(smollm2_gguf):
    """transformers' LlamaForCausalLM reading the same file in float32 (its own GGUF loader
    dequantizes it, maps the names, reads the metadata and puts the q/k rows in its rotary order)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' from_pretrained(gguf_file=...) needs accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, torch_dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def transformers_logits(transformers_model):
    with torch.inference_mode():
        return transformers_model(torch.tensor(TOKENS)).logits


def greedy_reference(model, prompt, n):
    """Greedy tokens and their log-probabilities by transformers, one full forward per token."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            t = int(lp.argmax())
            tokens.append(t)
            logprobs.append(float(lp[t]))
            ids.append(t)
    return tokens, logprobs


def test_smollm2_greedy_tokens(smollm2_logits):
    """Pinned: the next token after each position (found equal to transformers' below)."""
    assert smollm2_logits.argmax(-1).tolist() == [
        [29, 51, 95, 260, 198, 253, 216, 29, 657, 198], [29, 198, 99, 198, 198, 198, 4093, 1, 376, 198]]


def test_smollm2_answers(smollm2):
    assert smollm2.text_completion(["The capital of France is"], temperature=0, max_gen_len=2) == [
        {"generation": " Paris."}]


def test_smollm2_matches_transformers(smollm2_logits, transformers_logits):
    """Names, shapes, the q/k row order (llama.cpp stores Meta's), the metadata's hyper-parameters
    and the tied output layer: logits within 1e-4 of transformers', relative to their range."""
    diff = (smollm2_logits - transformers_logits).abs().max()
    assert diff <= 1e-4 * transformers_logits.abs().max(), diff
    assert torch.equal(smollm2_logits.argmax(-1), transformers_logits.argmax(-1))


def test_smollm2_generation_matches_transformers(smollm2, transformers_model):
    """Greedy generation through Llama.generate (batched prefill, KV cache, the GGUF's own
    vocabulary for the prompt): the same tokens and log-probabilities as transformers' step by step."""
    prompts = [smollm2.tokenizer.encode(p, bos=False, eos=False) for p in ("def fibonacci(n):", "The capital of")]
    tokens, logprobs = smollm2.generate(prompts, 12, temperature=0, logprobs=True, stop_token=-1)
    for prompt, got, got_lp in zip(prompts, tokens, logprobs):
        want, want_lp = greedy_reference(transformers_model, prompt, 12)
        assert got == want
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-4


def test_tied_output_layer_is_the_embedding_on_one_process(smollm2):
    """At MP=1 the tied output layer and the embedding are one tensor (no second dequantized copy)."""
    model = smollm2.model
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_memory_estimate_counts_a_tied_table_once(smollm2, smollm2_gguf):
    """python -m llama.memory on the file: its float32 weights are the bytes the built model holds,
    the tied embedding and output layer counted once."""
    held = {p.data_ptr(): p.nbytes for p in smollm2.model.parameters()}  # each storage once
    assert estimate(str(smollm2_gguf), 64, 2, 1, "float32")["weights"] == sum(held.values())


def test_smollm2_hyper_parameters(smollm2_gguf):
    reader = GGUFWeightReader(smollm2_gguf, 0, 1)
    args = ModelArgs(**reader.params())
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.rope_theta) == (
        576, 30, 9, 3, 1536, 100000.0)
    assert args.norm_eps == pytest.approx(1e-5)
    assert "output.weight" in reader.keys() and reader.shape("output.weight") == (SMOLLM2_VOCAB, 576)
    assert reader.dtype("layers.0.attention.wq.weight") == torch.float32  # Q4_1, dequantized
    assert torch.equal(reader.read("output.weight"), reader.read("tok_embeddings.weight"))


def run_split(path: Path, processes: int, tokens: list, out: Path, **build) -> dict:
    """tests/mp_gguf.py under torchrun (gloo): Llama.build on the GGUF file `path` (with `build`'s
    arguments) over `processes` processes; rank 0's {"logits", "tokens", "logprobs"} for `tokens`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(ROOT / "tests" / "mp_gguf.py"), str(path), str(out), json.dumps(tokens), json.dumps(build)]
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


def test_smollm2_split_over_three_processes(smollm2, smollm2_gguf, smollm2_logits, tmp_path):
    """torchrun, 3 processes (gloo), Llama.build on the file: each rank dequantizes its rows or
    block-aligned columns (and the tied output layer's rows); the gathered logits, greedy tokens and
    log-probabilities are those of one process."""
    need_processes(3)
    got = run_split(smollm2_gguf, 3, TOKENS, tmp_path / "logits.pt")
    torch.testing.assert_close(got["logits"], smollm2_logits, atol=1e-4, rtol=0)
    tokens, logprobs = smollm2.generate(TOKENS, 8, temperature=0, logprobs=True, stop_token=-1)
    assert got["tokens"] == tokens
    assert max(abs(a - b) for row, want in zip(got["logprobs"], logprobs) for a, b in zip(row, want)) < 1e-4


# Tiny GGUF files, written here --------------------------------------------------------------


def write_gguf(path: Path, tensors: dict, arch: str = "llama", **fields) -> Path:
    """A GGUF file of `tensors` (name -> float array, or (bytes, type) already encoded) and metadata
    `fields` (dots as "__": llama__block_count=2)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in fields.items():
        if value is None:
            continue
        key = key.replace("__", ".")
        {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](key, value)
    for name, value in tensors.items():
        data, qtype = value if isinstance(value, tuple) else (value, None)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_fields(params: dict, **changes) -> dict:
    """GGUF metadata for a Meta params.json whose FFN width is 192 (the tiny model's)."""
    fields = dict(
        llama__embedding_length=params["dim"], llama__block_count=params["n_layers"],
        llama__attention__head_count=params["n_heads"], llama__attention__head_count_kv=params["n_kv_heads"],
        llama__feed_forward_length=192, llama__rope__freq_base=float(params["rope_theta"]),
        llama__attention__layer_norm_rms_epsilon=float(params["norm_eps"]),
    )
    return {**fields, **changes}


def tiny_gguf(tiny_dir: Path, path: Path, qtype=GGMLQuantizationType.BF16, drop=(), extra=None, **changes) -> Path:
    """tiny_dir's weights as a GGUF file: 2-D weights encoded as `qtype`, norms in F32."""
    params = json.loads((tiny_dir / "params.json").read_text())
    tensors = {}
    for key, value in load_shard(tiny_dir / "consolidated.00.pth").items():
        name = gguf_name(key)
        if name is None or key in drop:
            continue
        array = value.float().numpy()
        tensors[name] = (quantize(array, qtype), qtype) if array.ndim == 2 else array
    return write_gguf(path, {**tensors, **(extra or {})}, **llama_fields(params, **changes))


@pytest.fixture(scope="module")
def bf16_gguf(tiny_dir, tmp_path_factory) -> Path:
    return tiny_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny-bf16.gguf")


def build(path, tokenizer: Path) -> Llama:
    return Llama.build(str(path), str(tokenizer), 64, 2, device=DEVICE, dtype="float32")


def test_bf16_gguf_is_the_meta_checkpoint(bf16_gguf, tiny_dir, generator):
    """The same bfloat16 weights from a GGUF file (no q/k reordering) and from consolidated.00.pth:
    the same logits, bit for bit, through Llama.build with the file as ckpt_dir."""
    got = build(bf16_gguf, tiny_dir / "tokenizer.model").model.forward(torch.tensor([[1, 45, 300, 12, 77]]), 0)
    assert torch.equal(got, generator.model.forward(torch.tensor([[1, 45, 300, 12, 77]]), 0))


def test_folder_of_one_gguf(bf16_gguf, tiny_dir, tmp_path):
    shutil.copyfile(bf16_gguf, tmp_path / bf16_gguf.name)
    assert build(tmp_path, tiny_dir / "tokenizer.model").model.params.n_layers == 2


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "F16"])
@pytest.mark.parametrize("mp", [2, 4])
def test_each_rank_reads_its_slice(tiny_dir, tmp_path, name, mp):
    """Every rank's slice of every tensor equals the same slice of the whole dequantized tensor:
    rows, block-aligned columns (2 ranks: 32 columns of 64) and columns that cut through blocks (4
    ranks: 16), the tied output layer's rows."""
    qtype = GGMLQuantizationType[name]
    path = tiny_gguf(tiny_dir, tmp_path / "tiny.gguf", qtype=qtype, drop=("output.weight",))
    whole, ranks = GGUFWeightReader(path, 0, 1), [GGUFWeightReader(path, rank, mp) for rank in range(mp)]
    for key in whole.keys():
        parts, dim = [r.read(key) for r in ranks], shard_dim(key)
        assert torch.equal(torch.cat(parts, dim) if dim is not None else parts[0], whole.read(key)), key
    embedding = load_shard(tiny_dir / "consolidated.00.pth")["tok_embeddings.weight"].float().numpy()
    assert torch.equal(whole.read("output.weight"), torch.from_numpy(dequantize(quantize(embedding, qtype), qtype)))


def test_k_quant_columns(tmp_path):
    """Q4_K blocks are 256 wide: 2 ranks of 512 columns start on a block, 4 ranks cut through one."""
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    raw = rng.integers(0, 256, (8, 2, size), dtype=np.uint8)
    raw[..., 0:4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # sane scales d, dmin
    raw = raw.reshape(8, 2 * size)
    path = write_gguf(tmp_path / "k.gguf", {"token_embd.weight": (raw, GGMLQuantizationType.Q4_K)},
                      llama__embedding_length=512)
    full = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_K))
    for mp in (2, 4):
        parts = [GGUFWeightReader(path, rank, mp).read("tok_embeddings.weight") for rank in range(mp)]
        assert torch.equal(torch.cat(parts, 1), full)
        rows = [GGUFWeightReader(path, rank, mp).read("output.weight") for rank in range(mp)]
        assert torch.equal(torch.cat(rows, 0), full)


# Files the loader refuses, each with a message that says what to do -------------------------


def fails(match, path, vocab_size=520):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load(path, vocab_size)


def test_non_finite_weight(tiny_dir, tmp_path):
    """check_weights=True applies to GGUF weights as to any others (here, quantized ones and an F32
    embedding with a NaN)."""
    embedding = load_shard(tiny_dir / "consolidated.00.pth")["tok_embeddings.weight"].float().numpy().copy()
    embedding[7, 3] = np.nan
    path = tiny_gguf(tiny_dir, tmp_path / "nan.gguf", qtype=GGMLQuantizationType.Q8_0,
                     extra={"token_embd.weight": embedding})
    distributed.setup_model_parallel(1, DEV)
    with pytest.raises(ValueError, match="tok_embeddings.weight .*NaN or infinite"):
        load_model(str(path), 520, 64, 2, Placement(0, 1, torch.float32, DEV), show_progress=False, check_weights=True)


def test_missing_file(tmp_path):
    fails("checkpoint file not found: .*missing.gguf", tmp_path / "missing.gguf")


def test_another_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": np.zeros((8, 32), np.float32)}, arch="gpt2",
                      gpt2__block_count=1)
    fails(r"holds a 'gpt2' model.*only Llama models", path)


def test_truncated_file(bf16_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(bf16_gguf.read_bytes()[:-1000])
    fails(r"cut\.gguf.*incomplete or corrupt.*download it again", path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "page.gguf"
    path.write_text("<html>404 Not Found</html>")
    fails(r"page\.gguf.*incomplete or corrupt", path)


def test_unsupported_tensor_type(tiny_dir, tmp_path):
    """An IQ4_NL tensor (bytes of the right size): named with its type and the types that work,
    before any weight is read."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL]
    raw = np.zeros((520, 64 // block * size), np.uint8)
    path = tiny_gguf(tiny_dir, tmp_path / "iq.gguf", extra={"output.weight": (raw, GGMLQuantizationType.IQ4_NL)})
    fails(r"output\.weight .*stored as IQ4_NL.*supported types: F32, F16, BF16, Q4_0", path)


def test_vocabulary_of_another_model(bf16_gguf):
    fails(r"vocabulary has 520 tokens but the tokenizer has 32016.*carries", bf16_gguf, vocab_size=32016)


def test_two_gguf_files_in_one_folder(bf16_gguf, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(bf16_gguf, tmp_path / name)
    fails(r"2 GGUF files \(a\.gguf, b\.gguf\); pass the path", tmp_path)


def test_metadata_without_layers(tiny_dir, tmp_path):
    path = tiny_gguf(tiny_dir, tmp_path / "t.gguf", llama__block_count=None)
    fails("lacks llama.block_count", path)


def test_rope_frequency_factors(tiny_dir, tmp_path):
    """Llama 3.1's GGUFs carry rope_freqs.weight: refused, not silently ignored."""
    path = tiny_gguf(tiny_dir, tmp_path / "t.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    fails("rope_freqs.weight .*rotary frequency factors", path)
