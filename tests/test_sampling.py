"""llama.sampling's per-row extras: the checks of SamplingParams, the logit processors against their
definitions written out by hand, top-k and min-p, and seeded rows that draw only from their own
generator."""

import pytest
import torch

from llama.engine import Engine
from llama.sampling import SamplingParams, process_logits, row_generator, sample_processed


@pytest.mark.parametrize("kwargs, word", [
    ({"top_logprobs": -1}, "top_logprobs"), ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": 1.5}, "seed"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logit_bias": ((5, 200.0),)}, "logit_bias"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
])
def test_new_fields_are_checked(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_plain_is_only_temperature_and_top_p():
    assert SamplingParams(0.7, 0.8, 10, logprobs=True, top_logprobs=3).plain
    for extra in ({"seed": 1}, {"top_k": 5}, {"min_p": 0.1}, {"presence_penalty": 0.5},
                  {"frequency_penalty": 0.5}, {"repetition_penalty": 1.2}, {"logit_bias": ((3, 1.0),)}):
        assert not SamplingParams(**extra).plain, extra


def test_process_logits_follows_openai_and_hf():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]])
    bias = torch.tensor([[0.0, 0.0, 0.0, -5.0], [0.0] * 4])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0] * 4])
    seen = torch.tensor([[False] * 4, [True, False, True, False]])
    out = process_logits(logits, bias, counts, seen, presence=torch.tensor([0.5, 0.0]),
                         frequency=torch.tensor([0.25, 0.0]), repetition=torch.tensor([1.0, 2.0]))
    want0 = [2.0 - 2 * 0.25 - 0.5, -1.0, 0.5 - 0.25 - 0.5, 3.0 - 5.0]
    want1 = [1.0 / 2, 1.0, -2.0 * 2, 0.0]
    assert torch.allclose(out, torch.tensor([want0, want1]))


def test_top_k_and_min_p_and_greedy_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    gens = [None, None, None]
    one = torch.ones(3)
    for _ in range(5):
        assert torch.equal(sample_processed(logits, one, one, torch.ones(3, dtype=torch.long), torch.zeros(3), gens), best)
        assert torch.equal(sample_processed(logits, one, one, torch.zeros(3, dtype=torch.long), one, gens), best)
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = {int(sample_processed(logits[:1], one[:1], one[:1], torch.tensor([3]), torch.zeros(1), [None]))
             for _ in range(60)}
    assert drawn <= top3 and len(drawn) > 1
    zero = torch.zeros(3)
    assert torch.equal(sample_processed(logits, zero, one, torch.zeros(3, dtype=torch.long), zero, gens), best)


def test_a_seeded_row_draws_the_same_whatever_the_other_rows():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    t, p, k, m = torch.ones(4), torch.ones(4), torch.zeros(4, dtype=torch.long), torch.zeros(4)
    alone = int(sample_processed(logits[2:3], t[:1], p[:1], k[:1], m[:1], [row_generator(9, logits.device)])[0])
    shared = torch.Generator().manual_seed(123)
    mixed = sample_processed(logits, t, p, k, m, [None, None, row_generator(9, logits.device), None], shared)
    assert int(mixed[2]) == alone
    draws = {int(sample_processed(logits[2:3], t[:1], p[:1], k[:1], m[:1], [row_generator(s, logits.device)])[0])
             for s in range(40)}
    assert len(draws) > 1, "different seeds draw differently"


def test_engine_seeded_rows_repeat_whatever_the_shared_generator(generator):
    engine = Engine(generator.model, seed=5)
    params = SamplingParams(1.0, 1.0, 10, seed=42)
    first = [g.tokens for g in engine.complete([[1, 45, 300], [1, 7]], params, [2])]
    engine.rng.manual_seed(999)
    again = [g.tokens for g in engine.complete([[1, 45, 300], [1, 7]], params, [2])]
    assert again == first
    other = [g.tokens for g in engine.complete([[1, 45, 300], [1, 7]], SamplingParams(1.0, 1.0, 10, seed=43), [2])]
    assert other != first
