"""GGUF files whose projections are stored on 4-bit grids (Q4_0, Q4_1, Q4_K: every 32 values of a
row are scale * code + low) load as int4 in groups of 32 with those grids kept, not quantized
again: the grids against gguf's own dequantizer, each rank's share, a whole model against a
quantized checkpoint that holds the same codes and scales (bit for bit), python -m llama.quantize's
copy, the default group size, and what the bfloat16 scales move."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from device import DEVICE, need_processes
from llama import Llama
from llama.files import load_shard
from llama.gguf import GGUFWeightReader, four_bit_grids, gguf_name
from llama.gguf_export import add_metadata, read_vocabulary
from llama.loading import grid_group, model_args, read_quantized
from llama.memory import estimate, weight_bytes
from llama.parallel import shard_dim
from llama.quantization import (
    Scheme,
    dequantize,
    from_grids,
    input_group,
    is_projection,
    quantize_int4,
    quantize_int8,
)
from llama.quantize import quantize_checkpoint
from test_gguf import run_split, tiny_gguf

Q4 = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K]
TOKENS = [[1, 45, 300, 12, 77, 8, 150, 9, 260, 33], [1, 7, 7, 7, 99, 400, 2, 5, 6, 10]]


def random_blocks(qtype, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Rows of random `qtype` blocks (any codes, any 6-bit Q4_K scales and mins) whose float16
    scales (and minimums) are ordinary numbers."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * columns // block, size), dtype=np.uint8)
    halves = 1 if qtype == GGMLQuantizationType.Q4_0 else 2  # d; or d and m (Q4_1), d and dmin (Q4_K)
    raw[:, :2 * halves] = rng.normal(0, 0.02, (len(raw), halves)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def grid_values(codes, scale, low) -> torch.Tensor:
    return (codes.float().unflatten(1, (-1, 32)) * scale[..., None] + low[..., None]).flatten(1)


@pytest.mark.parametrize("qtype", Q4, ids=lambda t: t.name)
def test_grids_are_the_blocks(qtype):
    """scale * code + low is exactly what gguf's own dequantizer makes of the same bytes."""
    raw = random_blocks(qtype, 6, 512)
    codes, scale, low = four_bit_grids(raw, qtype)
    assert codes.shape == (6, 512) and scale.shape == low.shape == (6, 16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(grid_values(codes, scale, low), torch.from_numpy(gguf_dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", Q4, ids=lambda t: t.name)
def test_bfloat16_scales_move_a_weight_by_the_bound(qtype):
    """from_grids keeps the codes; rounding scale and zero to bfloat16 moves each weight by at most
    (8 |scale| + |zero|) 2^-8 (bfloat16 rounds to 8 significant bits: 2^-8 relative at most)."""
    raw = random_blocks(qtype, 8, 256, seed=1)
    codes, scale, low = four_bit_grids(raw, qtype)
    kept = from_grids(codes, scale, low)
    assert kept.scheme == Scheme("int4", 32) and torch.equal(kept.values, codes)
    bound = ((8 * scale.abs() + (low + 8 * scale).abs()) * 2**-8).repeat_interleave(32, 1) + 1e-8  # + float32 sums
    assert ((dequantize(kept) - grid_values(codes, scale, low)).abs() <= bound).all()


def test_keeping_the_grids_beats_quantizing_again():
    """Gaussian rows quantized to Q4_0 by gguf (a grid of 16 steps, d * (code - 8), whose code 0 is
    the block's value of largest magnitude): kept, no weight moves by more than a 32nd of its
    step (from_grids's bound, zero 0); quantized again from the dequantized values, int4 in groups
    of 32 fits a grid of its own to each group's least and greatest value, and moves some weights
    by far more (measured 0.47 of a step)."""
    rng = np.random.default_rng(2)
    raw = gguf_quantize(rng.normal(0, 0.02, (64, 512)).astype(np.float32), GGMLQuantizationType.Q4_0)
    codes, scale, low = four_bit_grids(raw, GGMLQuantizationType.Q4_0)
    values, step = grid_values(codes, scale, low), scale.abs().repeat_interleave(32, 1)
    kept = (dequantize(from_grids(codes, scale, low)) - values).abs() / step
    again = (dequantize(quantize_int4(values, 32)) - values).abs() / step
    assert kept.max() <= 1 / 32 and again.max() > 8 * kept.max()


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1], ids=lambda t: t.name)
def test_each_rank_reads_its_grids(tiny_dir, tmp_path, qtype):
    """2 ranks: each rank's grids are its slice of the whole tensor's (rows, or 32 of 64 columns);
    4 ranks cut a row-parallel layer's 64 columns into 16, through its groups: no grids (the loader
    then says which group sizes fit)."""
    path = tiny_gguf(tiny_dir, tmp_path / "tiny.gguf", qtype=qtype)
    whole, ranks = GGUFWeightReader(path, 0, 1), [GGUFWeightReader(path, rank, 2) for rank in range(2)]
    assert grid_group(whole) == 32
    projections = [key for key in whole.keys() if is_projection(key)]
    for key in projections:
        for part, full in zip(zip(*(r.grids(key) for r in ranks)), whole.grids(key)):
            assert torch.equal(torch.cat(part, shard_dim(key)), full), key
    assert GGUFWeightReader(path, 1, 4).grids("layers.0.attention.wo.weight") is None
    assert GGUFWeightReader(path, 1, 4).grids("layers.0.attention.wq.weight") is not None


# A tiny model whose Q4_0 scales bfloat16 holds exactly -------------------------------------------------


def q4_0_bytes(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of codes (N, K) in 0..15 with float16 scales d (N, K / 32): per block d, then 16
    bytes whose low halves hold its first 16 codes and high halves the next 16."""
    n, k = codes.shape
    blocks = np.empty((n, k // 32, 18), np.uint8)
    blocks[..., :2] = d.astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    c = codes.reshape(n, k // 32, 32)
    blocks[..., 2:] = c[..., :16] | (c[..., 16:] << 4)
    return blocks.reshape(n, -1)


def write_q4_0_model(tiny_dir: Path, out: Path, finer=(), int8=()) -> tuple:
    """(a GGUF file of the tiny model, its vocabulary in it, with every projection Q4_0 with random
    codes and scales of 4 significant bits, which float16 and bfloat16 both hold exactly, except
    `finer`, stored in Q8_0; a quantized checkpoint in Meta's layout, int4 in groups of 32 with
    `int8` held in int8, of the same codes, scales and zeros (Q4_0's value of code 8 is 0), int8
    weights quantized from the file's values, and the same float tensors)."""
    rng = np.random.default_rng(3)
    params = json.loads((tiny_dir / "params.json").read_text())
    tensors, reference = {}, {}
    for key, value in load_shard(tiny_dir / "consolidated.00.pth").items():
        if gguf_name(key) is None:
            continue
        if not is_projection(key):
            tensors[gguf_name(key)] = (value.float().numpy(), None)
            reference[key] = value.float()
            continue
        n, k = value.shape
        base = key[: -len(".weight")]
        if key in finer:
            raw = gguf_quantize(value.float().numpy(), GGMLQuantizationType.Q8_0)
            tensors[gguf_name(key)] = (raw, GGMLQuantizationType.Q8_0)
            values = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.Q8_0))
        else:
            codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
            d = rng.integers(8, 16, (n, k // 32)) / 512 * rng.choice([-1, 1], (n, k // 32))
            tensors[gguf_name(key)] = (q4_0_bytes(codes, d), GGMLQuantizationType.Q4_0)
            values = grid_values(torch.from_numpy(codes), torch.from_numpy(d).float(), -8 * torch.from_numpy(d).float())
            reference[key] = torch.from_numpy(codes)
            reference[f"{base}.scale"] = torch.from_numpy(d).to(torch.bfloat16)
            reference[f"{base}.zero"] = torch.zeros(n, k // 32, dtype=torch.bfloat16)
        if key in int8:
            t = quantize_int8(values)
            reference[key], reference[f"{base}.scale"] = t.values, t.scale
            reference.pop(f"{base}.zero", None)
    path = out / "tiny-q4_0.gguf"
    writer = GGUFWriter(str(path), "llama")
    args = model_args(params, 520, 64, 1, str(tiny_dir))
    add_metadata(writer, args, "tiny", LlamaFileType.MOSTLY_Q4_0, read_vocabulary(tiny_dir / "tokenizer.model", 520))
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = out / "stored"
    folder.mkdir()
    torch.save(reference, folder / "consolidated.00.pth")
    scheme = {"mode": "int4", "group_size": 32, **({"int8": sorted(int8)} if int8 else {})}
    (folder / "params.json").write_text(json.dumps({**params, "quantization": scheme}))
    shutil.copyfile(tiny_dir / "tokenizer.model", folder / "tokenizer.model")
    return path, folder


@pytest.fixture(scope="module")
def exact_q4_0(tiny_dir, tmp_path_factory):
    """write_q4_0_model with every projection in Q4_0."""
    return write_q4_0_model(tiny_dir, tmp_path_factory.mktemp("q4_0"))


# llama.cpp's Q4_K_M keeps attn_v and ffn_down in Q6_K in some layers; here layer 1's, in Q8_0. wv is
# joined with wq and wk into one product: all three are held in int8.
FINER = ("layers.1.attention.wv.weight", "layers.1.feed_forward.w2.weight")
HELD_IN_INT8 = ("layers.1.attention.wq.weight", "layers.1.attention.wk.weight", *FINER)


@pytest.fixture(scope="module")
def mixed_q4_0(tiny_dir, tmp_path_factory):
    """write_q4_0_model with layer 1's wv and w2 in Q8_0."""
    return write_q4_0_model(tiny_dir, tmp_path_factory.mktemp("mixed"), finer=FINER, int8=HELD_IN_INT8)


def build(ckpt, **kw) -> Llama:
    return Llama.build(str(ckpt), max_seq_len=64, max_batch_size=2, device=DEVICE, dtype="float32", **kw)


def logits(generator: Llama) -> torch.Tensor:
    with torch.inference_mode():
        return generator.model.forward(torch.tensor(TOKENS), 0)


def test_int4_keeps_the_files_grids(exact_q4_0, tiny_dir):
    """quantize="int4" on the Q4_0 file, group size left to choose: groups of 32 (floats of the
    same widths get 64), and exactly the logits of the quantized checkpoint that stores the same
    codes and scales, through the same kernels, and the same greedy tokens."""
    path, stored = exact_q4_0
    kept, reference = build(path, quantize="int4"), build(stored)
    assert kept.model.layers[0].attention.wo.weight.group_size == 32
    assert build(tiny_dir, quantize="int4").model.layers[0].attention.wo.weight.group_size == 64
    assert torch.equal(logits(kept), logits(reference))
    assert (kept.generate(TOKENS, 8, temperature=0, stop_token=-1)[0]
            == reference.generate(TOKENS, 8, temperature=0, stop_token=-1)[0])


def test_quantized_copy_keeps_the_files_grids(exact_q4_0, tmp_path):
    """python -m llama.quantize --mode int4 on the Q4_0 file writes groups of 32 holding the file's
    own codes, scales and zeros (the reference checkpoint's tensors, bit for bit)."""
    path, stored = exact_q4_0
    out = quantize_checkpoint(str(path), str(tmp_path / "q"), "int4", show_progress=False)
    assert json.loads((out / "params.json").read_text())["quantization"] == {"mode": "int4", "group_size": 32}
    written, want = load_shard(out / "consolidated.00.pth"), load_shard(stored / "consolidated.00.pth")
    for key, value in want.items():
        if value.dtype != torch.float32:  # the projections' codes, scales and zeros
            assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


def test_memory_estimate_of_a_gguf_file(exact_q4_0):
    """python -m llama.memory reads a GGUF file's metadata, and int4 there is in the file's groups."""
    path, _ = exact_q4_0
    args = model_args(json.loads((exact_q4_0[1] / "params.json").read_text()), 520, 64, 1, "tiny")
    assert estimate(str(path), 64, 1, 1, "float32", quantize="int4")["weights"] == weight_bytes(
        args, 1, 4, Scheme("int4", 32))


def test_smollm2_default_keeps_its_grids(smollm2_gguf):
    """SmolLM2's Q4_1 projections: int4 by default in its groups of 32 (64 would fit its widths and
    mixes two grids: 67% top-1 agreement, README), each weight within the from_grids bound of the
    file's value."""
    reader = GGUFWeightReader(smollm2_gguf, 0, 1)
    assert build(smollm2_gguf, quantize="int4").model.layers[0].feed_forward.w2.weight.group_size == 32
    key = "layers.5.feed_forward.w2.weight"
    t = read_quantized(reader, key, Scheme("int4", 32), None, torch.device("cpu"), None)
    zero = t.zero.float().repeat_interleave(32, 1)
    bound = (8 * t.scale.float().abs().repeat_interleave(32, 1) + zero.abs()) * 2**-7  # rounded values: room
    assert ((dequantize(t) - reader.read(key)).abs() <= bound).all()


def test_smollm2_int4_split_over_three_processes(smollm2_gguf, tmp_path):
    """torchrun, 3 processes (gloo), quantize="int4" on SmolLM2's Q4_1 file: each rank keeps the
    grids of its rows, or of its 192 and 512 columns of wo and w2 (6 and 16 whole groups), so the
    ranks hold the weights one process holds and round the same blocks of activations: the
    gathered logits, greedy tokens and log-probabilities are one process's up to rounding. 16
    tokens in all, so that every product, the prompt's too, goes through the kernels that sum in
    float32 (more rows multiply bfloat16 weights in bfloat16, which rounds each rank's part of a
    row-parallel product where one process rounds the whole). Those kernels round each block of
    32 activations to 15-bit integers, where the two runs' float32 sums, summed in other orders,
    can round a value the other way: 2^-15 of its block at most, for each of 210 products (30
    layers of 7), independent, about sqrt(210) 2^-15 = 2^-11 of the logits' size; allowed: 2^-9
    of it (measured: 2^-12). A rank reading another's grids would be off by whole logits."""
    need_processes(3)
    tokens = [row[:8] for row in TOKENS]
    got = run_split(smollm2_gguf, 3, tokens, tmp_path / "logits.pt", quantize="int4")
    one = Llama.build(str(smollm2_gguf), max_seq_len=64, max_batch_size=len(tokens), device=DEVICE,
                      dtype="float32", quantize="int4")
    with torch.inference_mode():
        expected = one.model.forward(torch.tensor(tokens), 0)
    atol = 2**-9 * expected.abs().max().item()
    torch.testing.assert_close(got["logits"], expected, atol=atol, rtol=0)
    answers, logprobs = one.generate(tokens, 8, temperature=0, logprobs=True, stop_token=-1)
    assert got["tokens"] == answers
    assert max(abs(a - b) for row, want in zip(got["logprobs"], logprobs) for a, b in zip(row, want)) < 2 * atol


def test_projections_stored_with_more_bits_are_held_in_int8(mixed_q4_0):
    """A 4-bit file whose layer 1 keeps wv and w2 in 8 bits: int4 keeps the grids of the others and
    holds those two in int8 (a scale a row), with wq and wk (joined with wv into one product, which
    still serves: the native layers' step takes the model); exactly the logits of the quantized
    checkpoint holding the same, and python -m llama.quantize writes that checkpoint."""
    path, stored = mixed_q4_0
    kept, reference = build(path, quantize="int4"), build(stored)
    layers = kept.model.layers
    attention, ffn = layers[1].attention, layers[1].feed_forward
    formats = {name: getattr(attention if name in ("wq", "wk", "wv", "wo") else ffn, name).weight.format
               for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    assert formats == {"wq": "int8", "wk": "int8", "wv": "int8", "wo": "int4", "w1": "int4", "w2": "int8", "w3": "int4"}
    assert layers[0].attention.wv.weight.format == "int4" and layers[1].attention.wqkv.joined() is not None
    assert torch.equal(logits(kept), logits(reference))


def test_quantized_copy_of_a_mixed_file(mixed_q4_0, tmp_path):
    """python -m llama.quantize on the file writes the reference checkpoint: params.json lists the
    projections held in int8, and every tensor is the reference's, bit for bit; the memory
    estimate counts them in int8."""
    path, stored = mixed_q4_0
    out = quantize_checkpoint(str(path), str(tmp_path / "q"), "int4", show_progress=False)
    declared = json.loads((out / "params.json").read_text())["quantization"]
    assert declared == {"mode": "int4", "group_size": 32, "int8": sorted(HELD_IN_INT8)}
    written, want = load_shard(out / "consolidated.00.pth"), load_shard(stored / "consolidated.00.pth")
    assert written.keys() == want.keys()
    for key, value in want.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    args = model_args(json.loads((stored / "params.json").read_text()), 520, 64, 1, "tiny")
    assert estimate(str(path), 64, 1, 1, "float32", quantize="int4")["weights"] == weight_bytes(
        args, 1, 4, Scheme("int4", 32, frozenset(HELD_IN_INT8)))


def test_input_groups_are_the_models(tiny_dir):
    """input_group names the projections the model joins into one product (its SharedInputs)."""
    model = build(tiny_dir).model
    names = {module: name for name, module in model.named_modules()}
    groups = [m for m in model.modules() if type(m).__name__ == "SharedInput"]
    assert len(groups) == 2 * model.params.n_layers
    for group in groups:
        keys = [f"{names[layer]}.weight" for layer in group.layers]
        assert all(input_group(key) == keys for key in keys)
    assert input_group("layers.1.attention.wo.weight") == ["layers.1.attention.wo.weight"]


def test_mixed_file_split_over_two_processes(mixed_q4_0, tmp_path):
    """torchrun, 2 processes: the int8 projections' scales come from whole rows (w2's rows are
    split: a MAX over the ranks), the rest from the file's grids, so the ranks hold one process's
    weights: its logits up to rounding (2 layers: 2^-9 of the logits' size, as the SmolLM2 split
    above allows for 30), its greedy tokens."""
    need_processes(2)
    path, _ = mixed_q4_0
    tokens = [row[:8] for row in TOKENS]
    got = run_split(path, 2, tokens, tmp_path / "logits.pt", quantize="int4")
    one = build(path, quantize="int4")
    with torch.inference_mode():
        expected = one.model.forward(torch.tensor(tokens), 0)
    torch.testing.assert_close(got["logits"], expected, atol=2**-9 * expected.abs().max().item(), rtol=0)
    assert got["tokens"] == one.generate(tokens, 8, temperature=0, stop_token=-1)[0]
