"""The engine seam: SamplingParams, per-row batch state, and Engine used on its own."""

import pytest
import torch

from llama.batch import Rows
from llama.engine import Engine
from llama.sampling import SamplingParams


@pytest.mark.parametrize("kwargs, word", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_gen_len": -1}, "max_gen_len"),
    ({"max_gen_len": 2.0}, "max_gen_len"), ({"max_gen_len": True}, "max_gen_len"),
])
def test_sampling_params_are_checked_on_construction(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_rows_select_and_extend_keep_host_and_device_state_in_step():
    def rows(keys):
        n = len(keys)
        return Rows(keys=list(keys), left=[k * 10 for k in keys], pos_host=[k + 1 for k in keys], cap=[k + 2 for k in keys],
                    temps=[k / 10 for k in keys], top_ps=[1.0] * n, logits=torch.tensor(keys, dtype=torch.float)[:, None],
                    pos=torch.tensor([k + 1 for k in keys]), row_cap=torch.tensor([k + 2 for k in keys]),
                    row_temp=torch.tensor([k / 10 for k in keys]), row_top_p=torch.ones(n))

    both = Rows.empty().extend(rows([1, 2, 3])).extend(rows([4]))
    picked = both.select([3, 0])
    want = rows([4, 1])
    for name in ("keys", "left", "pos_host", "cap", "temps", "top_ps"):
        assert getattr(picked, name) == getattr(want, name)
    for name in ("logits", "pos", "row_cap", "row_temp", "row_top_p"):
        assert torch.equal(getattr(picked, name), getattr(want, name))


def test_engine_alone_gives_llama_generate_answers(generator):
    """An Engine built on the same model, seeded alike, answers as Llama.generate does."""
    engine = Engine(generator.model, seed=5)
    prompts = [[1, 45, 300, 12], [1, 7]]
    for temperature in (0, 0.8):
        generator.engine.rng.manual_seed(5)
        engine.rng.manual_seed(5)
        tokens, logprobs = generator.generate(prompts, 9, temperature=temperature, logprobs=True, echo=True)
        gens = engine.complete(prompts, SamplingParams(temperature, 0.9, 9, logprobs=True), [2], echo=True)
        assert [g.tokens for g in gens] == tokens
        assert [g.logprobs for g in gens] == logprobs


def test_admit_lets_rows_join_a_running_batch(generator):
    """Rows admitted into a running batch get the tokens they get alone."""
    engine = generator.engine
    greedy = SamplingParams(0, 1.0, 6)
    alone = {k: engine.complete([p], greedy, [-1])[0].tokens for k, p in enumerate([[1, 45, 300], [1, 7, 9, 11]])}
    batch = engine.open_batch([-1], logprobs=False)
    got = {0: [], 1: []}
    engine.admit(batch, [0], [[1, 45, 300]], [greedy])
    for u in batch.step(sync=True):
        got[u.row] += u.tokens
    engine.admit(batch, [1], [[1, 7, 9, 11]], [greedy])
    while batch:
        for u in batch.step(sync=True):
            got[u.row] += u.tokens
    assert got == alone


def test_stream_checks_now_and_runs_lazily(generator):
    engine = generator.engine
    with pytest.raises(ValueError, match="empty"):
        engine.stream([], SamplingParams(), [2])
    updates = list(engine.stream([1, 45, 300], SamplingParams(0, 1.0, 5), [-1]))
    assert [t for u in updates for t in u.tokens] == engine.complete([[1, 45, 300]], SamplingParams(0, 1.0, 5), [-1])[0].tokens
    assert updates[-1].finish_reason == "length"
