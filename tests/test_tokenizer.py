"""llama.tokenizer.Tokenizer on the tiny tokenizers, checked against sentencepiece itself."""

import pytest
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import Tokenizer as Backend
from tokenizers import models

from llama.bpe import BPETokenizer
from llama.tokenizer import Tokenizer, TokenizerProtocol

INFILLING_PIECES = {"prefix_id": "▁<PRE>", "middle_id": "▁<MID>", "suffix_id": "▁<SUF>", "eot_id": "▁<EOT>"}

TEXTS = [
    "def fib(n):\n    return n",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🦙🔥 and a ZWJ 👩‍💻",
    "Ω≈ç√∫ ¿qué? Привет",
    "\ttabs\nand\r\nnewlines\n",
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "",
]


@pytest.fixture(scope="module")
def model_path(tiny_dir):
    return str(tiny_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def step_model_path(tiny_step_dir):
    return str(tiny_step_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def sp(model_path):
    return SentencePieceProcessor(model_file=model_path)


@pytest.fixture(scope="module")
def step_tok(step_model_path):
    return Tokenizer(step_model_path)


@pytest.fixture(scope="module")
def step_sp(step_model_path):
    return SentencePieceProcessor(model_file=step_model_path)


@pytest.fixture(scope="module")
def sp_no_dummy(model_path):
    """The same model with sentencepiece's implicit leading space (add_dummy_prefix) switched off:
    an independent reference for encode_infilling."""
    proto = sp_pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    assert proto.normalizer_spec.add_dummy_prefix  # what the released tokenizers do, and what we undo
    proto.normalizer_spec.add_dummy_prefix = False
    return SentencePieceProcessor(model_proto=proto.SerializeToString())


# Special ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tok", "step_tok"])
def test_bos_eos_pad(which, request):
    t = request.getfixturevalue(which)
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, -1)


@pytest.mark.parametrize("which", [("tok", "sp"), ("step_tok", "step_sp")])
def test_n_words_is_sentencepiece_vocab_size(which, request):
    t, s = (request.getfixturevalue(name) for name in which)
    assert t.n_words == s.vocab_size() == s.get_piece_size()


def test_infilling_piece_ids(tok, sp):
    for attr, piece in INFILLING_PIECES.items():
        expected = sp.piece_to_id(piece)
        assert expected != sp.unk_id(), f"fixture tokenizer lacks {piece}"
        assert getattr(tok, attr) == expected, attr
    assert len({getattr(tok, a) for a in INFILLING_PIECES}) == 4


def test_step_id_is_none_without_step_piece(tok, sp):
    assert sp.piece_to_id("<step>") == sp.unk_id()  # the fixture really lacks it
    assert tok.step_id is None


def test_step_id(step_tok, step_sp):
    assert step_sp.piece_to_id("<step>") != step_sp.unk_id()
    assert step_tok.step_id == step_sp.piece_to_id("<step>")


def test_infilling_ids_are_none_without_infilling_pieces(step_tok, step_sp):
    for attr, piece in INFILLING_PIECES.items():
        assert step_sp.piece_to_id(piece) == step_sp.unk_id()
        assert getattr(step_tok, attr) is None, attr


def test_has_infilling(tok, step_tok):
    assert tok.has_infilling is True
    assert step_tok.has_infilling is False


# encode / decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (False, True), (True, True)])
def test_encode_bos_eos_flags(tok, sp, bos, eos):
    text = "def fib(n):"
    expected = ([1] if bos else []) + sp.encode(text) + ([2] if eos else [])
    assert tok.encode(text, bos=bos, eos=eos) == expected


def test_encode_empty_string(tok):
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert tok.encode("", bos=False, eos=False) == []


def test_decode_drops_pad(tok, sp):
    ids = sp.encode("return x")
    assert tok.decode([-1] + ids + [-1, -1]) == sp.decode(ids) == "return x"


def test_decode_skips_bos_eos(tok, sp):
    ids = sp.encode("return x")
    assert tok.decode([1] + ids + [2]) == "return x"


def test_token_piece(tok, sp):
    assert tok.token_piece(tok.prefix_id) == "▁<PRE>"
    assert tok.token_piece(1) == "<s>"
    for i in sp.encode("def fib"):
        assert tok.token_piece(i) == sp.id_to_piece(i)


def test_encode_adds_leading_space_piece(tok, sp):
    """Plain encode keeps sentencepiece's implicit leading space ("▁x")."""
    ids = tok.encode("x", bos=False, eos=False)
    assert sp.id_to_piece(ids[0]).startswith("▁")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_multibyte_text_uses_byte_fallback(tok, sp):
    """Characters missing from the vocabulary become <0x..> byte pieces and decode back."""
    text = "日本 🦙"
    pieces = [sp.id_to_piece(i) for i in tok.encode(text, bos=False, eos=False)]
    assert any(p.startswith("<0x") for p in pieces)
    assert sp.unk_id() not in tok.encode(text, bos=False, eos=False)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


# Infilling encodings ---------------------------------------------------------------------------


def test_encode_infilling_has_no_leading_space(tok, sp):
    pieces = [sp.id_to_piece(i) for i in tok.encode_infilling("def")]
    assert pieces, pieces
    assert not pieces[0].startswith("▁"), pieces


@pytest.mark.parametrize("text", [" x", "def", " foo", "\n    return y\n", "  two", "x = 1", "héllo 日本", ""])
def test_encode_infilling_equals_encode_without_dummy_prefix(tok, sp_no_dummy, text):
    assert tok.encode_infilling(text) == sp_no_dummy.encode(text)


def test_encode_infilling_keeps_an_explicit_space(tok, sp):
    """" x" keeps its one real space ("▁x"), but not the extra implicit one plain encode adds."""
    assert [sp.id_to_piece(i) for i in tok.encode_infilling(" x")] == ["▁x"]
    assert sp.decode(tok.encode_infilling(" x")) == "x"  # sentencepiece strips one leading space
    assert tok.encode(" x", bos=False, eos=False) != tok.encode_infilling(" x")


def test_decode_infilling_keeps_leading_space(tok):
    assert tok.decode_infilling(tok.encode_infilling(" foo")) == " foo"


@pytest.mark.parametrize("text", TEXTS)
def test_infilling_round_trip(tok, text):
    assert tok.decode_infilling(tok.encode_infilling(text)) == text


def test_decode_infilling_drops_pad(tok):
    assert tok.decode_infilling([-1] + tok.encode_infilling(" foo") + [-1]) == " foo"


# Special markers typed as text -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["<PRE>", " <PRE>", "x <PRE> y", "<SUF>", " <MID>", "<EOT>", "▁<PRE>"])
def test_marker_text_is_not_a_special_piece(tok, sp, text):
    special = {tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id}
    assert tok.encode(text, bos=False, eos=False) == sp.encode(text)
    assert not special & set(tok.encode(text, bos=False, eos=False))
    assert not special & set(tok.encode_infilling(text))


def test_step_text_is_not_the_step_piece(step_tok):
    for text in ["<step>", " <step>", "a <step> b"]:
        assert step_tok.step_id not in step_tok.encode(text, bos=True, eos=True)


# Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"x", None, 1, ["a"]])
def test_encode_rejects_non_str(tok, value):
    with pytest.raises(TypeError, match="str"):
        tok.encode(value, bos=True, eos=False)
    with pytest.raises(TypeError, match="str"):
        tok.encode_infilling(value)


def test_missing_model_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(str(path))
    msg = str(info.value)
    assert str(path) in msg and "tokenizer" in msg.lower()


def test_directory_instead_of_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer(str(tmp_path))


@pytest.mark.parametrize("content", [bytes(range(256)) * 3, b"<html><body>403 Forbidden</body></html>", b""])
def test_file_that_is_not_a_sentencepiece_model(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        Tokenizer(str(path))
    msg = str(info.value)
    assert str(path) in msg and "sentencepiece" in msg.lower()


# Built from a model's bytes; the one interface ---------------------------------------------------


def test_from_proto_equals_the_file(tok, model_path):
    with open(model_path, "rb") as f:
        other = Tokenizer.from_proto(f.read())
    for attr in ("n_words", "bos_id", "eos_id", "pad_id", "prefix_id", "middle_id", "suffix_id", "eot_id", "step_id",
                 "add_bos", "chat_template"):
        assert getattr(other, attr) == getattr(tok, attr), attr
    for text in TEXTS:
        assert other.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True)
        assert other.encode_infilling(text) == tok.encode_infilling(text)


def test_from_proto_add_bos(model_path):
    with open(model_path, "rb") as f:
        assert Tokenizer.from_proto(f.read(), add_bos=False).add_bos is False


def test_sentencepiece_tokenizer_starts_prompts_with_bos_and_has_no_template(tok):
    assert tok.add_bos is True and tok.chat_template is None


def protocol_members():
    """The attributes and methods TokenizerProtocol declares."""
    declared = set(TokenizerProtocol.__annotations__)
    declared |= {name for name in vars(TokenizerProtocol) if not name.startswith("_")}
    return declared


def test_every_tokenizer_offers_the_protocol(tok):
    bpe = BPETokenizer(Backend(models.BPE({"a": 0, "b": 1}, [])), bos_id=None, eos_id=0)
    members = protocol_members()
    assert {"encode", "decode", "token_piece", "encode_infilling", "decode_infilling", "has_infilling",
            "chat_template", "add_bos", "eot_id", "step_id", "n_words"} <= members
    for t in (tok, bpe):
        missing = [m for m in members if not hasattr(t, m)]
        assert not missing, (type(t).__name__, missing)
