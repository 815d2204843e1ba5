"""Generation against the naive implementation's greedy decoding, prompt by prompt."""

import random

import pytest
import sentencepiece as spm
import torch

from device import DEVICE
from llama import Llama
from llama.generation import UNSAFE_ERROR
from naive import NaiveLlama

PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox jumps over the lazy dog. Write"]


@pytest.fixture(scope="module")
def naive(tiny_dir):
    return NaiveLlama(tiny_dir)


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))


def assert_logprobs_close(got, expected, atol=1e-3):
    assert len(got) == len(expected)
    assert max((abs(a - b) for a, b in zip(got, expected)), default=0.0) < atol


def test_greedy_completion_matches_naive(generator, naive, sp):
    """A ragged batch gives each prompt the greedy tokens and log-probabilities of a full recompute."""
    results = generator.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True)
    for prompt, result in zip(PROMPTS, results):
        tokens, logprobs = naive.greedy([1] + sp.encode(prompt), 12, stop_ids={2})
        assert result["generation"] == sp.decode(tokens)
        assert result["tokens"] == [sp.id_to_piece(t) for t in tokens]
        assert_logprobs_close(result["logprobs"], logprobs)


def test_logprobs_are_real_values(generator):
    """The reference scores generated tokens before writing them and returns -0.0; these are not."""
    (result,) = generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=5, logprobs=True)
    assert all(lp < 0 for lp in result["logprobs"])


def test_echo_returns_prompt_and_its_logprobs(generator, naive, sp):
    prompt = [1] + sp.encode(PROMPTS[0])
    tokens, logprobs = generator.generate([prompt], max_gen_len=6, temperature=0, logprobs=True, echo=True)
    gen, gen_lp = naive.greedy(prompt, 6, stop_ids={2})
    assert tokens[0] == prompt + gen
    assert_logprobs_close(logprobs[0], naive.prompt_logprobs(prompt) + gen_lp)
    assert logprobs[0][0] == 0.0


def test_echo_in_text_completion(generator):
    (result,) = generator.text_completion(["import os"], temperature=0, max_gen_len=4, echo=True)
    (plain,) = generator.text_completion(["import os"], temperature=0, max_gen_len=4)
    assert result["generation"].startswith("import os")
    assert result["generation"].endswith(plain["generation"])


def test_stop_token_cuts_generation(generator, naive, sp):
    prompt = [1] + sp.encode(PROMPTS[1])
    gen, _ = naive.greedy(prompt, 10)
    stop = gen[3]
    first = gen.index(stop)
    tokens, _ = generator.generate([prompt], max_gen_len=10, temperature=0, stop_token=stop)
    assert tokens[0] == gen[:first]


def test_stop_inside_echoed_prompt_is_not_a_stop(generator, sp):
    """Only generated tokens end a generation; a stop id inside the echoed prompt does not."""
    prompt = [1] + sp.encode(PROMPTS[1])
    tokens, _ = generator.generate([prompt], max_gen_len=3, temperature=0, echo=True, stop_token=prompt[2])
    assert tokens[0][: len(prompt)] == prompt


def test_generation_never_exceeds_max_seq_len(generator, naive):
    max_seq_len = generator.model.params.max_seq_len
    prompt = [1] + [300] * (max_seq_len - 4)
    tokens, _ = generator.generate([prompt, [1, 5]], max_gen_len=50, temperature=0)
    assert len(prompt) + len(tokens[0]) <= max_seq_len
    assert len(tokens[0]) == 3 or 2 in naive.greedy(prompt, 3)[0]
    assert len(tokens[1]) == 50 or 2 in naive.greedy([1, 5], 50)[0]


def test_batched_equals_one_by_one(generator):
    """Ragged prompts batched together, in a batch larger than max_batch_size, give the answers
    each gets alone."""
    prompts = PROMPTS + ["x", "for i in range(10):", "SELECT name FROM users"]
    together = generator.text_completion(prompts, temperature=0, max_gen_len=8, logprobs=True)
    for prompt, result in zip(prompts, together):
        (alone,) = generator.text_completion([prompt], temperature=0, max_gen_len=8, logprobs=True)
        assert result["generation"] == alone["generation"]
        assert_logprobs_close(result["logprobs"], alone["logprobs"], atol=1e-4)


def test_sampling_is_seeded(tiny_dir):
    def build():
        return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 64, 2, device=DEVICE, dtype="float32", seed=7)

    a = build().text_completion(PROMPTS[:2], temperature=1.0, top_p=0.9, max_gen_len=16)
    b = build().text_completion(PROMPTS[:2], temperature=1.0, top_p=0.9, max_gen_len=16)
    greedy = build().text_completion(PROMPTS[:2], temperature=0, max_gen_len=16)
    assert a == b
    assert a != greedy


def test_infilling_matches_naive(generator, naive, sp):
    tok = generator.tokenizer
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    for suffix_first in (False, True):
        (result,) = generator.text_infilling([prefix], [suffix], temperature=0, max_gen_len=10, suffix_first=suffix_first)
        enc_suffix = sp.encode("☺" + suffix)[2:]
        if suffix_first:
            prompt = [1, tok.prefix_id, tok.suffix_id] + enc_suffix + [tok.middle_id] + sp.encode(prefix)
        else:
            prompt = [1, tok.prefix_id] + sp.encode(prefix) + [tok.suffix_id] + enc_suffix + [tok.middle_id]
        gen, _ = naive.greedy(prompt, 10, stop_ids={tok.eot_id, 2})
        middle = sp.decode([sp.piece_to_id("☺")] + gen)[1:]
        assert result["generation"] == middle
        assert result["full_text"] == prefix + middle + suffix


def test_chat_matches_naive(generator, naive, sp):
    dialog = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A sequence."},
        {"role": "user", "content": "And a dict?"},
    ]
    prompt = (
        [1] + sp.encode("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is a list? [/INST] A sequence. ") + [2]
        + [1] + sp.encode("[INST] And a dict? [/INST]")
    )
    (result,) = generator.chat_completion([dialog], temperature=0, max_gen_len=10, logprobs=True)
    gen, lps = naive.greedy(prompt, 10, stop_ids={2})
    assert result["generation"] == {"role": "assistant", "content": sp.decode(gen)}
    assert_logprobs_close(result["logprobs"], lps)


def test_70b_chat_matches_naive(step_generator, tiny_step_dir):
    naive = NaiveLlama(tiny_step_dir)
    sp = step_generator.tokenizer.sp_model
    step = step_generator.tokenizer.step_id
    dialog = [{"role": "user", "content": "Write hello world."}]
    prompt = (
        [1] + sp.encode(" Source: system") + [step]
        + sp.encode(" Source: user") + sp.encode("\n\n Write hello world.") + [step]
        + sp.encode(" Source: assistant\nDestination: user") + sp.encode("\n\n ")
    )
    (result,) = step_generator.chat_completion([dialog], temperature=0, max_gen_len=10)
    gen, _ = naive.greedy(prompt, 10, stop_ids={step, 2})
    assert result["generation"] == {"role": "assistant", "content": sp.decode(gen), "destination": "user"}


def test_special_tags_are_refused(generator):
    dialogs = [
        [{"role": "user", "content": "hi [INST] there"}],
        [{"role": "user", "content": "hello"}],
    ]
    unsafe, safe = generator.chat_completion(dialogs, temperature=0, max_gen_len=4)
    assert unsafe["generation"]["content"] == UNSAFE_ERROR
    assert safe["generation"]["content"] != UNSAFE_ERROR


def test_second_build_in_one_process(tiny_dir, tiny_step_dir, generator):
    """Building again (another checkpoint, another dtype) leaves the first generator working."""
    before = generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=6)
    other = Llama.build(str(tiny_step_dir), str(tiny_step_dir / "tokenizer.model"), 32, 1, device=DEVICE, dtype="bfloat16")
    assert other.model.output.weight.dtype == torch.bfloat16
    assert other.text_completion(["hi"], temperature=0, max_gen_len=4)[0]["generation"]
    assert generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=6) == before


def test_bfloat16_is_close_to_float32(tiny_dir, generator):
    """The default on CUDA is bfloat16; its logits track float32 closely on the same weights."""
    bf16 = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 64, 1, device=DEVICE, dtype=torch.bfloat16)
    tokens = torch.tensor([[1, 45, 300, 12, 77, 8]])
    diff = (bf16.model.forward(tokens, 0) - generator.model.forward(tokens, 0)).abs().max()
    assert diff < 0.5


def plain_generate(model, prompts, max_gen_len, stop_token):
    """The reference's algorithm on the public forward: decoding starts at the shortest prompt,
    longer prompts are fed one token per step, the chosen token replaced by the prompt's."""
    lengths = [len(p) for p in prompts]
    total = min(model.params.max_seq_len, max(lengths) + max_gen_len)
    tokens = torch.full((len(prompts), total), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    logprobs = torch.zeros(tokens.shape)
    is_prompt = tokens != -1
    prev = 0
    for cur in range(min(lengths), total):
        logits = model.forward(tokens[:, prev:cur], prev)
        tokens[:, cur] = torch.where(is_prompt[:, cur], tokens[:, cur], logits[:, -1].argmax(-1))
        # logits at positions prev..cur-1 score the tokens at prev+1..cur
        logprobs[:, prev + 1 : cur + 1] = torch.log_softmax(logits, -1).gather(2, tokens[:, prev + 1 : cur + 1, None])[..., 0]
        prev = cur
    out = []
    for i, n in enumerate(lengths):
        toks, lps = tokens[i, n : n + max_gen_len].tolist(), logprobs[i, n : n + max_gen_len].tolist()
        if stop_token in toks:
            toks, lps = toks[: toks.index(stop_token)], lps[: toks.index(stop_token)]
        out.append((tokens[i, :n].tolist() + toks, logprobs[i, 1:n].tolist(), lps))
    return out


def test_batched_prefill_equals_plain_algorithm(generator, sp):
    """One pass over a ragged batch, rows finishing at different steps, echo and logprobs: the
    same tokens as the reference's token-by-token loop, log-probabilities within 1e-3."""
    prompts = [[1] + sp.encode(p) for p in PROMPTS[1:] + ["x", "for i in range(10):\n    print(i)"]]
    alone = [generator.generate([p], 12, temperature=0)[0][0] for p in prompts]
    stop = alone[1][4]  # ends some rows early, not others
    tokens, logprobs = generator.generate(prompts, 12, temperature=0, logprobs=True, echo=True, stop_token=stop)
    expected = plain_generate(generator.model, prompts, 12, stop)
    assert any(stop in a for a in alone) and not all(stop in a for a in alone)
    for got, got_lp, (exp, exp_prompt_lp, exp_lp) in zip(tokens, logprobs, expected):
        assert got == exp
        assert_logprobs_close(got_lp, [0.0] + exp_prompt_lp + exp_lp)


def test_prefill_groups_bound_padding():
    from llama.batch import prefill_groups

    assert prefill_groups([]) == []
    assert prefill_groups([7]) == [range(0, 1)]
    assert prefill_groups([3, 145, 185, 372]) == [range(0, 1), range(1, 3), range(3, 4)]
    assert prefill_groups([10, 10, 11, 12]) == [range(0, 4)]
    lengths = sorted(random.Random(0).randrange(1, 500) for _ in range(64))
    groups = prefill_groups(lengths)
    assert [i for g in groups for i in g] == list(range(64))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 1.25 * real


def test_compiled_decode_gives_the_same_answers(tiny_dir, generator):
    """compile=True (torch.compile of the decode step, static shapes) changes nothing but speed,
    across batch sizes as rows finish and are dropped."""
    compiled = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 128, 4, device=DEVICE,
                           dtype="float32", compile=True)
    prompts = PROMPTS + ["x"]
    stop = generator.generate([[1, 5]], 6, temperature=0)[0][0][2]
    expected = generator.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True)
    got = compiled.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True)
    assert compiled.engine.decoder.broken is None
    for a, b in zip(got, expected):
        assert a["generation"] == b["generation"]
        assert_logprobs_close(a["logprobs"], b["logprobs"], atol=1e-4)
    tokens = compiled.generate([[1, 5], [1, 7, 9, 11]], 6, temperature=0, stop_token=stop)[0]
    assert tokens == generator.generate([[1, 5], [1, 7, 9, 11]], 6, temperature=0, stop_token=stop)[0]


def test_compiled_decode_compiles_each_shape_once(tiny_dir, generator):
    """The compiled step compiles once per (rows, cache length) bucket and reuses it: batches of
    different sizes taking turns (each turn past the first runs only the guards that tell the
    compiled shapes apart) and positions moving through the cache (on the CPU the step attends
    over the positions in use, a length it is compiled for symbolically) give the eager answers
    without compiling again."""
    from torch._dynamo.utils import counters

    compiled = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 128, 4, device=DEVICE,
                           dtype="float32", compile=True)
    batches = [[[1, 5, 9]], [[1, 7], [1, 3, 4, 5, 6, 8], [1, 2]]]
    for prompts in batches:  # compile both shapes first
        compiled.generate(prompts, 4, temperature=0, stop_token=-1)
    graphs = counters["stats"]["unique_graphs"]
    for turn in range(2):
        for prompts in batches:
            n = 20 + 30 * turn  # later turns decode further into the cache
            got = compiled.generate(prompts, n, temperature=0, stop_token=-1)[0]
            assert got == generator.generate(prompts, n, temperature=0, stop_token=-1)[0]
    assert compiled.engine.decoder.broken is None
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_decode_follows_a_growing_cache(tiny_dir, generator):
    """When a longer batch grows the cache to new tensors of a new length, the compiled step sees
    the new shape (it keeps dynamo's guards on its inputs, the cache length among them) and
    compiles for it: answers stay the eager ones before and after."""
    compiled = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 600, 2, device=DEVICE,
                           dtype="float32", compile=True)
    eager = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 600, 2, device=DEVICE, dtype="float32")
    long_prompt = [1] + [3 + i % 50 for i in range(290)]
    for prompts, n in (([[1, 5, 9]], 8), ([long_prompt], 12), ([[1, 7, 2]], 8)):
        assert compiled.generate(prompts, n, temperature=0, stop_token=-1)[0] == \
            eager.generate(prompts, n, temperature=0, stop_token=-1)[0]
    assert compiled.engine.decoder.caches[1].seq_len == 512
    assert compiled.engine.decoder.broken is None


def test_compiled_models_side_by_side_keep_their_own_steps(tiny_dir, generator):
    """Two compiled models in one process (another dtype and weight format, the same shapes) each
    run their own compiled step: each gives its eager twin's answers."""
    def build(**kw):
        return Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 128, 2, device=DEVICE, **kw)

    pairs = [(build(dtype="float32", compile=True), generator), (build(dtype="bfloat16", compile=True),
             build(dtype="bfloat16"))]
    prompts = [[1, 5, 9], [1, 7]]
    for _ in range(2):  # taking turns
        for compiled, eager in pairs:
            assert compiled.generate(prompts, 6, temperature=0, stop_token=-1) == \
                eager.generate(prompts, 6, temperature=0, stop_token=-1)
            assert compiled.engine.decoder.broken is None
