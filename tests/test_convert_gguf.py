"""python -m llama.convert to-gguf: the GGUF file read back with gguf-py's own GGUFReader, against
the Meta checkpoint, its params.json and its tokenizer.model, and against what llama.cpp's
converters write (their tensor names, their q/k permutation of a Hugging Face copy)."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

import llama.gguf_export
from device import DEVICE
from llama import Llama
from llama.convert import main
from llama.gguf_export import write_gguf
from llama.tiny import write_tiny_model

FILE_TYPE_IDS = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_*


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    """tiny_dir written as GGUF in every type, once: {type: path}."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(str(tiny_dir), str(out / f"tiny-{t}.gguf"), t, show_progress=False) for t in FILE_TYPE_IDS}


def metadata(path: Path) -> dict:
    """Every key the file holds (the reader's own GGUF.* header fields left out) -> its value."""
    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    """GGUF name -> (numpy shape, type, values as float32 in (rows, columns))."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (shape, t.tensor_type, values)
    return out


def meta_tensors(folder: Path) -> dict:
    """GGUF name (by llama.cpp's own name map) -> the Meta checkpoint's float32 tensor."""
    state = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)
    params = json.loads((folder / "params.json").read_text())
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, params["n_layers"])
    return {names.get_name(k, try_suffixes=(".weight",)): v.float().numpy() for k, v in state.items() if k != "rope.freqs"}


def proto(path: Path):
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_metadata_is_what_llama_cpp_writes_for_a_llama(tiny_dir, exports):
    params = json.loads((tiny_dir / "params.json").read_text())
    state = torch.load(tiny_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
    sp = SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    got = metadata(exports["f32"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert len(got.pop(key)) == state["tok_embeddings.weight"].shape[0]  # contents: the vocabulary test
    assert got == {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": tiny_dir.name,
        "general.file_type": 0,
        "general.quantization_version": 2,
        "llama.context_length": 16384,  # rope_theta 1e6: Code Llama
        "llama.embedding_length": params["dim"],
        "llama.block_count": params["n_layers"],
        "llama.feed_forward_length": state["layers.0.feed_forward.w1.weight"].shape[0],
        "llama.attention.head_count": params["n_heads"],
        "llama.attention.head_count_kv": params["n_kv_heads"],
        "llama.rope.freq_base": params["rope_theta"],
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(params["norm_eps"], rel=1e-7),  # float32
        "llama.rope.dimension_count": params["dim"] // params["n_heads"],
        "llama.vocab_size": state["tok_embeddings.weight"].shape[0],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.eot_token_id": sp.piece_to_id("▁<EOT>"),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }


@pytest.mark.parametrize("kind", list(FILE_TYPE_IDS))
def test_file_type_and_quantization_version(exports, kind):
    got = metadata(exports[kind])
    assert got["general.file_type"] == FILE_TYPE_IDS[kind]
    assert got["general.quantization_version"] == gguf.GGML_QUANT_VERSION


def test_llama2_context_length(tiny_dir, tmp_path):
    """rope_theta below 1e6 (Llama 2's 10000): llama.cpp's 4096-token context."""
    src = copy_checkpoint(tiny_dir, tmp_path / "llama2")
    params = json.loads((src / "params.json").read_text())
    params["rope_theta"] = 10000.0
    (src / "params.json").write_text(json.dumps(params))
    got = metadata(write_gguf(str(src), str(tmp_path / "out.gguf"), show_progress=False))
    assert got["llama.context_length"] == 4096 and got["llama.rope.freq_base"] == 10000.0


def test_f32_tensors_are_the_meta_tensors(tiny_dir, exports):
    """Every tensor under llama.cpp's name, in (rows, columns), bit for bit; q/k rows as Meta's."""
    expected = meta_tensors(tiny_dir)
    got = tensors(exports["f32"])
    assert list(got) == list(expected)  # the checkpoint's order, rope.freqs left out
    for name, (shape, kind, values) in got.items():
        assert kind == Q.F32 and shape == expected[name].shape, name
        assert np.array_equal(values, expected[name]), name


def test_f16_and_bf16_tensors(tiny_dir, exports):
    """Matrices in f16 (within its rounding) or bf16 (exact: the source is bfloat16); norms in f32."""
    expected = meta_tensors(tiny_dir)
    for kind, qtype in (("f16", Q.F16), ("bf16", Q.BF16)):
        for name, (shape, got_type, values) in tensors(exports[kind]).items():
            x = expected[name]
            assert shape == x.shape, name
            if x.ndim == 1:
                assert got_type == Q.F32 and np.array_equal(values, x), name
            elif qtype == Q.BF16:
                assert got_type == Q.BF16 and np.array_equal(values, x), name
            else:
                assert got_type == Q.F16, name
                np.testing.assert_allclose(values, x, rtol=2**-11, atol=2**-24, err_msg=name)


def test_q8_0_tensors(tiny_dir, exports):
    """Matrices in Q8_0, each value within its 32-value block's step (max|x|/127, half of it for
    the rounding, a little more for the f16 scale); norms in f32, exact."""
    expected = meta_tensors(tiny_dir)
    for name, (shape, kind, values) in tensors(exports["q8_0"]).items():
        x = expected[name]
        assert shape == x.shape, name
        if x.ndim == 1:
            assert kind == Q.F32 and np.array_equal(values, x), name
            continue
        assert kind == Q.Q8_0, name
        blocks, err = x.reshape(-1, 32), np.abs(values - x).reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert (err <= step * 0.57 + 1e-12).all(), name
        assert err.max() > 0, name  # it is quantized


def test_q8_0_rows_not_tiled_by_blocks_are_f16(tmp_path):
    """dim 48: rows of 48 values are not whole Q8_0 blocks; llama.cpp's converter stores those
    matrices as f16. ffn_down's rows (128 values) are."""
    src = write_tiny_model(tmp_path / "dim48", dim=48, n_heads=4, n_kv_heads=2, n_layers=1)
    types = {name: kind for name, (_, kind, _) in tensors(write_gguf(str(src), str(tmp_path / "out.gguf"), "q8_0",
                                                                      show_progress=False)).items()}
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == Q.F16
    assert types["blk.0.attn_norm.weight"] == Q.F32


def test_qk_rows_are_what_llama_cpp_makes_of_the_hf_copy(tiny_dir, hf_dir, exports):
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) turns Hugging Face's rotate-half q/k
    rows into the rows it stores; applied to the to-hf copy, it gives our GGUF's rows."""
    params = json.loads((tiny_dir / "params.json").read_text())

    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    hf = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        hf.update(load_file(f))
    got = tensors(exports["f32"])
    for i in range(params["n_layers"]):
        for proj, heads in (("q", params["n_heads"]), ("k", params["n_kv_heads"])):
            w = hf[f"model.layers.{i}.self_attn.{proj}_proj.weight"].float().numpy()
            assert np.array_equal(got[f"blk.{i}.attn_{proj}.weight"][2], llama_cpp_permute(w, heads))


@pytest.mark.parametrize("source", ["tiny_mp2_dir", "hf_dir"])
def test_other_layouts_give_the_same_file(request, exports, source, tmp_path):
    """Two model-parallel shards, or the Hugging Face copy: the same tensors and keys."""
    src = request.getfixturevalue(source)
    path = write_gguf(str(src), str(tmp_path / "out.gguf"), show_progress=False)
    expected, got = tensors(exports["f32"]), tensors(path)
    assert set(got) == set(expected)
    for name, (shape, kind, values) in got.items():
        assert (shape, kind) == expected[name][:2] and np.array_equal(values, expected[name][2]), name
    a, b = metadata(exports["f32"]), metadata(path)
    assert a.pop("general.name") != b.pop("general.name") and a == b


def test_vocabulary_round_trips(tiny_dir, exports):
    """Pieces, scores and types as the tokenizer.model holds them (sentencepiece's piece types
    are numbered as llama.cpp's token types: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
    UNUSED 5, BYTE 6)."""
    pieces = proto(tiny_dir / "tokenizer.model").pieces
    got = metadata(exports["q8_0"])
    assert got["tokenizer.ggml.tokens"] == [p.piece for p in pieces]
    assert np.array_equal(np.float32(got["tokenizer.ggml.scores"]), np.float32([p.score for p in pieces]))
    assert got["tokenizer.ggml.token_type"] == [int(p.type) for p in pieces]
    assert {2, 3, 5, 6} <= set(got["tokenizer.ggml.token_type"])  # unk, control, unused, byte pieces
    types = sentencepiece_model_pb2.ModelProto.SentencePiece
    assert (types.NORMAL, types.UNKNOWN, types.CONTROL, types.USER_DEFINED, types.UNUSED, types.BYTE) == (1, 2, 3, 4, 5, 6)


def test_vocabulary_padded_to_the_embedding(tiny_dir, tmp_path):
    """A tokenizer with fewer pieces than the embedding has rows: [PADn] pieces, unused, as
    llama.cpp's converter pads; one with more pieces is refused."""
    src = copy_checkpoint(tiny_dir, tmp_path / "short")
    m = proto(src / "tokenizer.model")
    n = len(m.pieces)
    del m.pieces[n - 3:]
    (src / "tokenizer.model").write_bytes(m.SerializeToString())
    got = metadata(write_gguf(str(src), str(tmp_path / "short.gguf"), show_progress=False))
    assert got["tokenizer.ggml.tokens"][n - 3:] == [f"[PAD{i}]" for i in range(n - 3, n)]
    assert got["tokenizer.ggml.token_type"][n - 3:] == [5, 5, 5]
    assert got["tokenizer.ggml.scores"][n - 3:] == [-1000.0] * 3

    for i in range(11):
        m.pieces.add(piece=f"<extra{i}>", score=0.0)
    (src / "tokenizer.model").write_bytes(m.SerializeToString())
    with pytest.raises(ValueError, match="pieces but the model's embedding only"):
        write_gguf(str(src), str(tmp_path / "long.gguf"), show_progress=False)
    assert not (tmp_path / "long.gguf").exists()


def test_source_without_tokenizer_is_refused(tiny_dir, tmp_path):
    src = copy_checkpoint(tiny_dir, tmp_path / "no_tok")
    (src / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        write_gguf(str(src), str(tmp_path / "out.gguf"), show_progress=False)
    assert not (tmp_path / "out.gguf").exists()


def test_not_a_sentencepiece_model_is_refused(tiny_dir, tmp_path):
    src = copy_checkpoint(tiny_dir, tmp_path / "bad_tok")
    (src / "tokenizer.model").write_text("<html>expired link</html>")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        write_gguf(str(src), str(tmp_path / "out.gguf"), show_progress=False)


def test_existing_output_is_never_overwritten(tiny_dir, tmp_path):
    dst = tmp_path / "taken.gguf"
    dst.write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        write_gguf(str(tiny_dir), str(dst), show_progress=False)
    assert dst.read_text() == "keep me"
    with pytest.raises(FileExistsError, match="is a folder"):
        write_gguf(str(tiny_dir), str(tmp_path), show_progress=False)


def test_checkpoint_that_does_not_match_its_params_is_refused(tiny_dir, tmp_path):
    src = copy_checkpoint(tiny_dir, tmp_path / "three_layers")
    params = json.loads((src / "params.json").read_text())
    params["n_layers"] = 3
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"missing: \['layers\.2\."):
        write_gguf(str(src), str(tmp_path / "out.gguf"), show_progress=False)


def test_unknown_type_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="use one of f32, f16, bf16, q8_0"):
        write_gguf(str(tiny_dir), str(tmp_path / "out.gguf"), "q4_0", show_progress=False)


def test_gguf_source_is_refused(exports, tmp_path):
    with pytest.raises(ValueError, match="is a GGUF file already"):
        write_gguf(str(exports["f32"]), str(tmp_path / "out.gguf"), "q8_0", show_progress=False)


def test_failure_midway_leaves_no_file(tiny_dir, tmp_path, monkeypatch):
    """The file is written under another name and renamed once complete."""
    encode, calls = llama.gguf_export.encode, []

    def failing(tensor, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return encode(tensor, qtype)

    monkeypatch.setattr(llama.gguf_export, "encode", failing)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(str(tiny_dir), str(tmp_path / "out.gguf"), show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "sub" / "tiny.gguf"
    main(["to-gguf", str(tiny_dir), str(dst), "--type", "q8_0"])
    assert capsys.readouterr().out.strip() == f"wrote {dst}"
    assert metadata(dst)["general.file_type"] == FILE_TYPE_IDS["q8_0"]
    with pytest.raises(SystemExit) as e:
        main(["to-gguf", str(tiny_dir), str(dst)])
    assert e.value.code == 1 and "already exists" in capsys.readouterr().err


def test_export_loads_back_as_the_meta_checkpoint(tiny_dir, exports, generator):
    """python -m llama.convert to-gguf, then Llama.build on the file alone (its own vocabulary):
    the f32 export gives the Meta checkpoint's logits bit for bit and greedy answers, and its
    rebuilt sentencepiece vocabulary tokenizes every text (infilling pieces too) as tokenizer.model."""
    exported = Llama.build(str(exports["f32"]), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32")
    tokens = torch.tensor([[1, 45, 300, 12, 77, 8], [1, 7, 7, 99, 400, 2]])
    assert torch.equal(exported.model.forward(tokens, 0), generator.model.forward(tokens, 0))
    meta, ours = generator.tokenizer, exported.tokenizer
    for text in ["def fibonacci(n: int) -> int:", "  héllo wörld 🦙\n\tx = 1", "The quick brown fox."]:
        assert ours.encode(text, bos=True, eos=False) == meta.encode(text, bos=True, eos=False)
        assert ours.encode_infilling(text) == meta.encode_infilling(text)
    assert (ours.prefix_id, ours.suffix_id, ours.middle_id, ours.eot_id) == (meta.prefix_id, meta.suffix_id,
                                                                          meta.middle_id, meta.eot_id)
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    assert exported.text_infilling([prefix], [suffix], temperature=0, max_gen_len=10) == \
        generator.text_infilling([prefix], [suffix], temperature=0, max_gen_len=10)
