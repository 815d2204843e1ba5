"""The tokenizer files `python -m llama.convert to-hf` writes (llama/hf_tokenizer.py), loaded by
transformers as its users load them: AutoTokenizer and GenerationConfig on the converted folder give
the ids, special tokens, chat prompts and stop ids of this package's own tokenizer."""

import json

import pytest

from llama.convert import to_hf
from llama.formats import chat_prompt_tokens
from llama.hf_tokenizer import build_backend, tokenizer_files
from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, STEP_PIECE, SUFFIX_PIECE, Tokenizer
from llama.vocabulary import hf_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "def remove_non_ascii(s: str) -> str:\n    \"\"\"Remove non-ASCII characters.\"\"\"\n    return s",
    "    return fibonacci(n - 1)",  # leading spaces: sentencepiece's dummy prefix goes before them
    "  two", " one", " ", "",
    "\tif x:\n\t\tpass\n\n\n",
    "class A:\n\n    def f(self):\n        x = {'k': [1, 2]}  # comment\n",
    "naïve café → ∑ 你好 🦙 \u00a0nbsp",
    "SELECT * FROM t WHERE a >= 10 AND b <> 'x';",
]
DIALOGS = [
    [{"role": "user", "content": "Write a function that reverses a string."}],
    [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "  sort a list  "},
     {"role": "assistant", "content": "sorted(xs)\n    # done"}, {"role": "user", "content": "and in place?"}],
]


@pytest.fixture(scope="module")
def hf_step_dir(tiny_step_dir, tmp_path_factory):
    """The 70B-like tiny model (<step>, no infilling pieces) converted."""
    return to_hf(str(tiny_step_dir), str(tmp_path_factory.mktemp("hf_step") / "hf"), show_progress=False)


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_auto_tokenizer_gives_our_ids(hf_dir, tiny_dir):
    ours = Tokenizer(str(tiny_dir / "tokenizer.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in TEXTS:
        assert ids(theirs, text) == ours.encode(text, bos=True, eos=False), text
        assert theirs.decode(ids(theirs, text), skip_special_tokens=True) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (ours.bos_id, ours.eos_id, 0)


def test_infilling_pieces_are_single_special_ids(hf_dir, tiny_dir):
    ours = Tokenizer(str(tiny_dir / "tokenizer.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    expected = {PREFIX_PIECE: ours.prefix_id, MIDDLE_PIECE: ours.middle_id, SUFFIX_PIECE: ours.suffix_id,
                EOT_PIECE: ours.eot_id}
    for piece, i in expected.items():
        assert theirs.convert_tokens_to_ids(piece) == i
        assert theirs(piece, add_special_tokens=False)["input_ids"] == [i]  # never split
        assert piece in theirs.all_special_tokens
    # Written into a text, they are cut out whole, and the text between them is encoded as ours.
    prompt = f"{PREFIX_PIECE}def f(x):\n    {SUFFIX_PIECE}"
    assert ids(theirs, prompt) == [1, ours.prefix_id] + ours.encode("def f(x):\n    ", False, False) + [ours.suffix_id]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (config["prefix_token"], config["eot_token"]) == (PREFIX_PIECE, EOT_PIECE)


def test_generation_config_has_the_stop_ids(hf_dir, hf_step_dir, tiny_dir, tiny_step_dir):
    ours = Tokenizer(str(tiny_dir / "tokenizer.model"))
    config = transformers.GenerationConfig.from_pretrained(str(hf_dir))
    assert config.bos_token_id == ours.bos_id
    assert config.eos_token_id == [ours.eos_id, ours.eot_id]  # EOS, and <EOT> that ends an infilled middle
    step = Tokenizer(str(tiny_step_dir / "tokenizer.model"))
    config = transformers.GenerationConfig.from_pretrained(str(hf_step_dir))
    assert config.eos_token_id == [step.eos_id, step.step_id]  # EOS, and <step> that ends a 70B turn


@pytest.mark.parametrize("which", ["hf_dir", "hf_step_dir"])
def test_chat_template_gives_our_chat_prompts(which, request):
    """apply_chat_template with the written template ([INST], or the 70B turns with <step>) gives the
    ids of this package's chat format."""
    folder = request.getfixturevalue(which)
    ours = Tokenizer(str(folder / "tokenizer.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (STEP_PIECE in theirs.all_special_tokens) == (ours.step_id is not None)
    for dialog in DIALOGS:
        got = theirs.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        got = got["input_ids"] if hasattr(got, "keys") else got
        assert got == chat_prompt_tokens(ours, dialog)


def test_same_ids_as_transformers_own_conversion(tiny_dir, tiny_step_dir):
    """transformers' sentencepiece -> tokenizers conversion (the reference) agrees with ours."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    for folder in (tiny_dir, tiny_step_dir):
        proto = sp_pb.ModelProto()
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        reference = convert.SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
        ours = build_backend(folder / "tokenizer.model")
        for text in TEXTS:
            assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text).ids, text


def test_our_own_reader_loads_the_converted_tokenizer_json(hf_dir, tiny_dir):
    ours = Tokenizer(str(tiny_dir / "tokenizer.model"))
    read = hf_tokenizer(hf_dir / "tokenizer.json")
    assert (read.bos_id, read.eos_id, read.add_bos) == (ours.bos_id, ours.eos_id, True)
    for text in TEXTS:
        assert read.encode(text, bos=True, eos=False) == ours.encode(text, bos=True, eos=False)
        assert read.decode(ours.encode(text, bos=True, eos=False)) == text


def test_a_vocabulary_it_cannot_reproduce_is_refused(tmp_path):
    """A unigram sentencepiece model (not Llama's BPE) is refused before anything is written."""
    import sentencepiece as spm

    lines = ["def f(x): return x", "for i in range(10): print(i)", "hello world"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uni"), vocab_size=40,
                                   model_type="unigram", minloglevel=2, hard_vocab_limit=False)
    with pytest.raises(ValueError, match="only BPE models"):
        tokenizer_files(tmp_path / "uni.model", 16384)
