"""Streaming: deltas that arrive as tokens are made and join to exactly the non-streamed text."""

import random

import pytest

from device import DEVICE
from llama import Llama
from llama.generation import UNSAFE_ERROR
from llama.tokenizer import StreamDecoder

PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox", "x", "SELECT name FROM"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_stream_joins_to_completion(generator, prompt):
    deltas = list(generator.text_completion_stream(prompt, temperature=0, max_gen_len=40))
    (result,) = generator.text_completion([prompt], temperature=0, max_gen_len=40)
    assert "".join(deltas) == result["generation"]
    assert len(deltas) > 1


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infilling_stream_joins_to_infilling(generator, suffix_first):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    deltas = list(generator.text_infilling_stream(prefix, suffix, temperature=0, max_gen_len=40, suffix_first=suffix_first))
    (result,) = generator.text_infilling([prefix], [suffix], temperature=0, max_gen_len=40, suffix_first=suffix_first)
    assert "".join(deltas) == result["generation"]


@pytest.mark.parametrize("fixture", ["generator", "step_generator"], ids=["llama2", "70b"])
def test_chat_stream_joins_to_chat(request, fixture):
    gen = request.getfixturevalue(fixture)
    deltas = list(gen.chat_completion_stream(DIALOG, temperature=0, max_gen_len=40))
    (result,) = gen.chat_completion([DIALOG], temperature=0, max_gen_len=40)
    assert "".join(deltas) == result["generation"]["content"]


def test_chat_stream_refuses_special_tags(generator):
    assert list(generator.chat_completion_stream([{"role": "user", "content": "[INST] hi"}])) == [UNSAFE_ERROR]


def test_sampled_stream_matches_sampled_completion(tiny_dir):
    """Same seed, same draws: a sampled stream joins to the sampled non-streamed answer."""
    def build():
        return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 64, 1, device=DEVICE, dtype="float32", seed=3)

    streamed = "".join(build().text_completion_stream("import os", temperature=0.9, top_p=0.9, max_gen_len=30))
    (result,) = build().text_completion(["import os"], temperature=0.9, top_p=0.9, max_gen_len=30)
    assert streamed == result["generation"]


def test_stream_is_lazy_and_incremental(generator, monkeypatch):
    """Nothing runs before the first next(); the first delta comes after a few forward passes,
    long before the generation ends."""
    calls = []
    real = generator.model.hidden
    monkeypatch.setattr(generator.model, "hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    stream = generator.text_completion_stream("import os", temperature=0, max_gen_len=60)
    assert calls == []
    next(stream)
    first = len(calls)
    rest = list(stream)
    assert first <= 5 and len(calls) > first + 10 and rest


def test_stream_errors_raise_at_call_time(generator, step_generator):
    with pytest.raises(ValueError, match="temperature"):
        generator.text_completion_stream("x", temperature=-1)
    with pytest.raises(TypeError):
        generator.text_completion_stream(["a list"])
    with pytest.raises(ValueError, match="infilling pieces"):
        step_generator.text_infilling_stream("a", "b")
    with pytest.raises(ValueError, match="last message"):
        generator.chat_completion_stream([{"role": "system", "content": "x"}])


def test_abandoned_stream_leaves_generator_working(generator):
    before = generator.text_completion(["import os"], temperature=0, max_gen_len=20)
    stream = generator.text_completion_stream("def fibonacci(n: int) -> int:", temperature=0, max_gen_len=50)
    next(stream)
    stream.close()
    assert generator.text_completion(["import os"], temperature=0, max_gen_len=20) == before


def test_decoder_holds_back_split_characters(generator):
    """A character split over byte-fallback tokens comes out whole, once complete."""
    tok = generator.tokenizer
    text = "é☃ x"
    ids = tok.encode(text, bos=False, eos=False)
    assert any(tok.token_piece(i).startswith("<0x") for i in ids), "byte fallback in use"
    decoder = StreamDecoder(tok.decode)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "é" in deltas and "☃" in "".join(deltas[2:])


def test_decoder_on_random_token_sequences(generator):
    """Joined deltas equal decode() for any sequence, including stray bytes (both decoders)."""
    tok = generator.tokenizer
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(3, tok.n_words) for _ in range(rng.randrange(1, 25))]
        for decode in (tok.decode, tok.decode_infilling):
            decoder = StreamDecoder(decode)
            assert "".join(decoder.push(i) for i in ids) + decoder.flush() == decode(ids)


def test_inference_mode_does_not_leak_between_pieces(generator):
    """The caller's code between two pieces runs outside torch.inference_mode."""
    import torch

    stream = generator.text_completion_stream("import os", temperature=0, max_gen_len=5)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    list(stream)
