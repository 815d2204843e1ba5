"""llama.vocabulary: which tokenizer a checkpoint uses, and the tokenizers it reads from GGUF files
and tokenizer.json, checked against independent references: Meta's tokenizer.model through
sentencepiece itself, and transformers' tokenizer for the same SmolLM2 GGUF."""

import gguf
import pytest
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from llama.bpe import BPETokenizer
from llama.formats import (
    chat_prompt_tokens,
    chat_stop_ids,
    completion_prompt_tokens,
    infilling_prompt_tokens,
    refuses_dialog,
)
from llama.protocol import APIError, parse_chat
from llama.tokenizer import StreamDecoder, Tokenizer
from llama.vocabulary import checkpoint_tokenizer, load_tokenizer, save_tokenizer

CODE = 'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
SP_TEXTS = [
    CODE,
    "The quick brown fox jumps over the lazy dog.",
    "x <PRE> y <SUF> z <MID> ▁<EOT> <s></s>",
    "héllo wörld 日本語のテキスト 🦙🔥 👩‍💻",
    "  two leading spaces, trailing   ",
    "\ttabs\nand\r\nnewlines\n",
    "123 4567 3.14",
    "",
]
# Text where transformers' GGUF loader and llama.cpp agree (see test_smollm2_digits_stand_alone).
BPE_TEXTS = [
    CODE,
    "The quick brown fox jumps over the lazy dog. It's a 'quoted' word, isn't it?",
    "<|im_start|>user\nWrite a loop<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>x",
    "a  b   c\n\n\n    d\t\t e  ",
    "    leading and trailing    ",
    "version 2024, 1.5e-3, x1 = 99; [1,2,3]",
    "Ça coûte 15 € — naïve façade, Ærøskøbing",
    "中文文本和日本語のテキスト，한국어",
    "emoji 🦙🔥 and a ZWJ family 👩‍👩‍👧 and a flag 🇫🇷",
    "Ω≈ç√∫ ¿qué? Привет мир",
    "",
]
DIALOGS = [
    [{"role": "user", "content": "Write fib in Python."}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Écris « bonjour » 🦙"}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  two  spaces\n\nand lines  "},
    ],
]


def write_vocab_gguf(path, model, tokens, scores=None, types=None, merges=None, pre=None, **keys):
    """A GGUF file holding only a vocabulary (no tensors), with tokenizer.ggml.* `keys`."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    if types is not None:
        writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    for key, value in keys.items():
        if isinstance(value, bool):
            writer.add_bool(f"tokenizer.ggml.{key}", value)
        else:
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sentencepiece_gguf(model_path, out, **keys):
    """The GGUF vocabulary of a tokenizer.model, its pieces read with sentencepiece's own protobuf."""
    proto = sp_pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    pieces = list(proto.pieces)
    ids = dict(bos_token_id=proto.trainer_spec.bos_id, eos_token_id=proto.trainer_spec.eos_id,
               unknown_token_id=proto.trainer_spec.unk_id)
    return write_vocab_gguf(out, "llama", [p.piece for p in pieces], [p.score for p in pieces],
                            [int(p.type) for p in pieces], **{**ids, **keys})


# Sentencepiece ("llama") GGUF vocabularies ---------------------------------------------------------


@pytest.fixture(scope="module")
def meta(tiny_dir):
    """Meta's tokenizer.model; its .sp_model is sentencepiece itself, the reference."""
    return Tokenizer(str(tiny_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def from_gguf(tiny_dir, tmp_path_factory):
    path = sentencepiece_gguf(tiny_dir / "tokenizer.model", tmp_path_factory.mktemp("spm_gguf") / "tiny.gguf")
    return load_tokenizer(str(path), None)


def test_sentencepiece_gguf_is_the_sentencepiece_tokenizer(from_gguf, meta):
    assert isinstance(from_gguf, Tokenizer)
    for attr in ("n_words", "bos_id", "eos_id", "pad_id", "prefix_id", "middle_id", "suffix_id", "eot_id", "step_id"):
        assert getattr(from_gguf, attr) == getattr(meta, attr), attr
    assert from_gguf.has_infilling and from_gguf.add_bos and from_gguf.chat_template is None


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_gguf_ids_equal_meta_tokenizer(from_gguf, meta, text):
    sp = meta.sp_model
    assert from_gguf.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]
    assert from_gguf.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_gguf_infilling_encoding_equals_meta_tokenizer(from_gguf, meta, text):
    assert from_gguf.encode_infilling(text) == meta.encode_infilling(text)
    assert from_gguf.decode_infilling(meta.encode_infilling(text)) == meta.decode_infilling(meta.encode_infilling(text))


def test_sentencepiece_gguf_infilling_prompt_equals_meta_tokenizer(from_gguf, meta):
    for suffix_first in (False, True):
        got = infilling_prompt_tokens(from_gguf, "def f(x):\n    ", "\n    return y", suffix_first=suffix_first)
        assert got == infilling_prompt_tokens(meta, "def f(x):\n    ", "\n    return y", suffix_first=suffix_first)


def test_sentencepiece_gguf_step_tokenizer_chats_like_meta(tiny_step_dir, tmp_path):
    """A 70B-like vocabulary: <step> found, and the 70B chat format token for token."""
    path = sentencepiece_gguf(tiny_step_dir / "tokenizer.model", tmp_path / "step.gguf")
    tok, meta = load_tokenizer(str(path), None), Tokenizer(str(tiny_step_dir / "tokenizer.model"))
    assert tok.step_id == meta.step_id is not None
    for dialog in DIALOGS:
        assert chat_prompt_tokens(tok, dialog) == chat_prompt_tokens(meta, dialog)
    assert chat_stop_ids(tok) == chat_stop_ids(meta)


def test_sentencepiece_gguf_without_space_prefix(tiny_dir, tmp_path):
    """add_space_prefix false: no implicit leading space, like sentencepiece with add_dummy_prefix off."""
    path = sentencepiece_gguf(tiny_dir / "tokenizer.model", tmp_path / "nospace.gguf", add_space_prefix=False)
    proto = sp_pb.ModelProto()
    proto.ParseFromString((tiny_dir / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    reference = SentencePieceProcessor(model_proto=proto.SerializeToString())
    tok = load_tokenizer(str(path), None)
    for text in ["def", " x = 1", "héllo"]:
        assert tok.encode(text, bos=False, eos=False) == reference.encode(text)


def test_sentencepiece_gguf_add_bos_false(tiny_dir, tmp_path):
    path = sentencepiece_gguf(tiny_dir / "tokenizer.model", tmp_path / "nobos.gguf", add_bos_token=False)
    tok = load_tokenizer(str(path), None)
    assert completion_prompt_tokens(tok, "x = 1")[0] != tok.bos_id
    assert tok.encode("x", bos=True, eos=False)[0] == tok.bos_id  # bos=True still adds it


# Byte-level BPE ("gpt2") GGUF vocabularies: SmolLM2 ---------------------------------------------------


def test_smollm2_vocabulary(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert isinstance(tok, BPETokenizer)
    assert tok.n_words == 49152
    assert (tok.token_piece(tok.bos_id), tok.token_piece(tok.eos_id)) == ("<|im_start|>", "<|im_end|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (1, 2, 2, 2)
    assert tok.add_bos is False  # tokenizer.ggml.add_bos_token
    assert not tok.has_infilling and tok.step_id is None
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("text", BPE_TEXTS)
def test_smollm2_ids_equal_transformers(smollm2_tokenizer, smollm2_hf_tokenizer, text):
    expected = smollm2_hf_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.encode(text, bos=False, eos=False) == expected


@pytest.mark.parametrize("text", [t for t in BPE_TEXTS if "<|" not in t])  # special tokens decode to nothing
def test_smollm2_round_trip(smollm2_tokenizer, smollm2_hf_tokenizer, text):
    ids = smollm2_tokenizer.encode(text, bos=True, eos=True)
    assert smollm2_tokenizer.decode(ids) == text == smollm2_hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_smollm2_digits_stand_alone(smollm2_tokenizer):
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) cut every digit out
    before GPT-2's word split, so a run of spaces before a digit stays one word. (transformers'
    GGUF loader skips that cut and gives "x", "Ġ", "Ġ", "1".)"""
    tok = smollm2_tokenizer
    assert tok.encode("x  1", bos=False, eos=False) == [
        104,  # x
        256,  # ĠĠ
        33,  # 1
    ]
    ids = tok.encode("[\n    1]", bos=False, eos=False)
    assert [tok.token_piece(i) for i in ids] == ["[", "ĊĠĠĠĠ", "1", "]"]


def test_smollm2_special_token_text_is_its_id(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.encode("<|im_start|>", bos=False, eos=False) == [1]
    assert tok.encode("hi", bos=True, eos=True) == [1, 6004, 2]  # <|im_start|> hi <|im_end|>
    assert tok.decode([-1, 1, 6004, 2, -1]) == "hi"  # padding and special tokens add nothing


def test_smollm2_stream_of_an_emoji_split_over_byte_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Llama 🦙 done"
    ids = tok.encode(text, bos=False, eos=False)
    emoji_tokens = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert len(emoji_tokens) >= 2, [tok.token_piece(i) for i in ids]
    assert tok.decode(ids[: ids.index(emoji_tokens[0]) + 1]).endswith("\ufffd")
    stream = StreamDecoder(tok.decode)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_smollm2_completion_prompt_has_no_bos(smollm2_tokenizer, smollm2_hf_tokenizer):
    prompt = "def fib(n):"
    assert completion_prompt_tokens(smollm2_tokenizer, prompt) == smollm2_hf_tokenizer(prompt)["input_ids"]


def test_smollm2_cannot_infill(smollm2_tokenizer):
    with pytest.raises(ValueError, match="infilling"):
        infilling_prompt_tokens(smollm2_tokenizer, "def f():", "    return 1")


@pytest.mark.parametrize("dialog", DIALOGS)
def test_smollm2_chat_template_equals_transformers(smollm2_tokenizer, smollm2_hf_tokenizer, dialog):
    expected = smollm2_hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    assert chat_prompt_tokens(smollm2_tokenizer, dialog) == expected["input_ids"]


def test_smollm2_chat_stops_at_end_of_turn(smollm2_tokenizer):
    assert chat_stop_ids(smollm2_tokenizer) == [2]  # <|im_end|> is both EOS and the end of a turn


def test_smollm2_chat_endpoint_uses_the_template(smollm2_tokenizer, smollm2_hf_tokenizer):
    dialog = DIALOGS[1]
    job = parse_chat({"messages": dialog}, smollm2_tokenizer, 4096).jobs[0]
    assert job.prompt_tokens == chat_prompt_tokens(smollm2_tokenizer, dialog)


def test_template_refusal_is_a_bad_request(smollm2_tokenizer):
    tok = BPETokenizer(smollm2_tokenizer.backend, 1, 2, chat_template="{{ raise_exception('no system messages') }}")
    with pytest.raises(ValueError, match="no system messages"):
        chat_prompt_tokens(tok, DIALOGS[0])
    with pytest.raises(APIError) as info:
        parse_chat({"messages": DIALOGS[0]}, tok, 4096)
    assert info.value.status == 400 and "no system messages" in str(info.value)


def test_template_end_of_turn_distinct_from_eos(smollm2_tokenizer):
    """A ChatML model whose EOS is <|endoftext|>: its answers also stop at <|im_end|>."""
    tok = BPETokenizer(smollm2_tokenizer.backend, 1, 0, eot_id=2, chat_template=smollm2_tokenizer.chat_template)
    assert chat_stop_ids(tok) == [2, 0]


# Hugging Face tokenizer.json ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(smollm2_hf_tokenizer, tmp_path_factory):
    """transformers' SmolLM2 tokenizer saved as Hugging Face writes it: tokenizer.json,
    tokenizer_config.json and chat_template.jinja."""
    folder = tmp_path_factory.mktemp("smollm2_hf")
    smollm2_hf_tokenizer.save_pretrained(str(folder))
    return folder


def test_tokenizer_json_folder(hf_folder, smollm2_hf_tokenizer):
    tok = load_tokenizer(None, str(hf_folder))
    assert isinstance(tok, BPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.add_bos) == (1, 2, 2, 2, False)
    for text in BPE_TEXTS + ["x  1", "[\n    1]"]:  # the saved tokenizer.json is transformers' own
        assert tok.encode(text, bos=False, eos=False) == smollm2_hf_tokenizer.encode(text, add_special_tokens=False)
    for dialog in DIALOGS:
        expected = smollm2_hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        assert chat_prompt_tokens(tok, dialog) == expected["input_ids"]


def test_tokenizer_json_path(hf_folder):
    tok = load_tokenizer(str(hf_folder / "tokenizer.json"), "unused")
    assert tok.n_words == 49152 and tok.chat_template is not None


def test_tokenizer_json_without_eos(tmp_path, hf_folder):
    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(None, str(tmp_path))


# Which file: resolution and errors --------------------------------------------------------------------


def test_checkpoint_folder_with_tokenizer_model(tiny_dir):
    assert isinstance(load_tokenizer(None, str(tiny_dir)), Tokenizer)


def test_checkpoint_gguf_file_and_folder_with_one_gguf(tiny_dir, tmp_path):
    path = sentencepiece_gguf(tiny_dir / "tokenizer.model", tmp_path / "model.gguf")
    assert load_tokenizer(None, str(path)).n_words == load_tokenizer(None, str(tmp_path)).n_words == 520


def test_folder_with_several_ggufs(tiny_dir, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        sentencepiece_gguf(tiny_dir / "tokenizer.model", tmp_path / name)
    with pytest.raises(ValueError, match="a.gguf"):
        load_tokenizer(None, str(tmp_path))


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_tokenizer(None, str(tmp_path))


def test_unknown_gguf_vocabulary_is_named(tmp_path):
    path = write_vocab_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[UNK]", "a"], types=[3, 2, 1])
    with pytest.raises(ValueError, match="'bert'"):
        load_tokenizer(str(path), None)


def test_unknown_pre_tokenizer_is_named(tmp_path):
    path = write_vocab_gguf(tmp_path / "odd.gguf", "gpt2", ["a", "b", "ab"], types=[1, 1, 1], merges=["a b"],
                            pre="no-such-pre", eos_token_id=0)
    with pytest.raises(ValueError, match="'no-such-pre'"):
        load_tokenizer(str(path), None)


def test_gguf_vocabulary_without_eos(tmp_path):
    path = write_vocab_gguf(tmp_path / "noeos.gguf", "gpt2", ["a", "b"], types=[1, 1], merges=[], pre="gpt-2")
    with pytest.raises(ValueError, match="eos_token_id"):
        load_tokenizer(str(path), None)


def test_missing_tokenizer_files(tmp_path):
    for name in ("model.gguf", "tokenizer.json"):
        with pytest.raises(FileNotFoundError, match=name):
            load_tokenizer(str(tmp_path / name), None)


def test_small_gpt2_gguf(tmp_path):
    """A hand-made byte-level vocabulary: merges applied in order, control tokens matched whole."""
    tokens = ["<eos>", "a", "b", "Ġ", "ab", "Ġab"]
    path = write_vocab_gguf(tmp_path / "small.gguf", "gpt2", tokens, types=[3, 1, 1, 1, 1, 1],
                            merges=["a b", "Ġ ab"], pre="gpt-2", eos_token_id=0)
    tok = load_tokenizer(str(path), None)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.add_bos) == (6, None, 0, False)
    assert tok.encode("ab ab<eos>", bos=False, eos=False) == [4, 5, 0]
    assert completion_prompt_tokens(tok, "ab") == [4]
    with pytest.raises(ValueError, match="BOS"):
        tok.encode("ab", bos=True, eos=False)


def test_only_code_llama_formats_refuse_their_markers(smollm2_tokenizer, tiny_dir):
    """[INST] in a message is Code Llama's injection guard; a model with its own template takes the
    messages as given (as transformers does)."""
    dialog = [{"role": "user", "content": "What does [INST] mean in a Llama prompt?"}]
    assert refuses_dialog(Tokenizer(str(tiny_dir / "tokenizer.model")), dialog)
    assert not refuses_dialog(smollm2_tokenizer, dialog)


SAVED_TEXTS = ["def f(x):\n    return x ** 2  # naïve, 日本語", "  two  spaces\ttab\n\n", ""]


def check_same_tokenizer(a, b):
    for field in ("n_words", "bos_id", "eos_id", "pad_id", "eot_id", "add_bos", "chat_template"):
        assert getattr(a, field, None) == getattr(b, field, None), field
    for text in SAVED_TEXTS:
        assert a.encode(text, bos=True, eos=True) == b.encode(text, bos=True, eos=True)
        ids = a.encode(text, bos=False, eos=False)
        assert b.decode(ids) == a.decode(ids)


def test_saved_bpe_tokenizer_reads_back_the_same(smollm2_tokenizer, tmp_path):
    """A GGUF's byte-level BPE vocabulary written as tokenizer.json and tokenizer_config.json (what
    a quantized copy of the checkpoint carries) is the same tokenizer: special ids, BOS, chat
    template (ChatML's end of turn included), ids of text with spaces, tabs and non-ASCII."""
    save_tokenizer(smollm2_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    check_same_tokenizer(smollm2_tokenizer, checkpoint_tokenizer(tmp_path))


def test_saved_sentencepiece_tokenizer_reads_back_the_same(tiny_dir, tmp_path):
    original = load_tokenizer(None, str(tiny_dir))
    save_tokenizer(original, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]
    check_same_tokenizer(original, checkpoint_tokenizer(tmp_path))
