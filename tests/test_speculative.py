"""Speculative decoding (llama/speculative.py): prompt lookup and draft models give exactly the
plain answers under greedy decoding (ragged batches, logprobs, echo, stop ids, budgets, streaming,
infilling, chat, rows joining a running batch, MP=2), the target's distribution under sampling (a
chi-square test against the exact probabilities, which a broken rule fails), and clear errors."""

import json
import math
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import mp_requests
from device import DEVICE
from llama import Llama
from llama import speculative
from llama.sampling import SamplingParams
from llama.tiny import write_tiny_model
from test_distributed import ROOT, assert_same_answers, torchrun

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "import os\nimport os\nimport",
    "x",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
]
PREFIX, SUFFIX = "def add(a, b):\n    c = a + b\n", "\n    return c\n\ndef add(a, b):\n    c = a + b\n"
DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a list? A list."}]


def build(ckpt, **kw) -> Llama:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny_dir as its own draft is not smaller than the target
        return Llama.build(str(ckpt), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32", **kw)


@pytest.fixture(scope="module")
def small_draft_dir(tmp_path_factory) -> Path:
    """A one-layer tiny model with tiny_dir's tokenizer (another seed): a draft that is rarely right."""
    return write_tiny_model(tmp_path_factory.mktemp("draft_small"), n_layers=1, seed=3)


@pytest.fixture(scope="module")
def near_draft_dir(tiny_dir, tmp_path_factory) -> Path:
    """tiny_dir with noise on its output layer: a draft that is often, not always, right."""
    out = tmp_path_factory.mktemp("draft_near") / "near"
    shutil.copytree(tiny_dir, out)
    state = torch.load(out / "consolidated.00.pth")
    w = state["output.weight"].float()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    state["output.weight"] = (w + 0.15 * w.std() * noise).to(state["output.weight"].dtype)
    torch.save(state, out / "consolidated.00.pth")
    return out


@pytest.fixture(scope="module")
def speculators(tiny_dir, small_draft_dir):
    """Speculative generators on tiny_dir: prompt lookup adaptive and k=3, a small draft (adaptive)
    and tiny_dir as its own draft (k=5: every proposal is accepted)."""
    return {
        "ngram": build(tiny_dir, speculative="ngram"),
        "ngram_k3": build(tiny_dir, speculative="ngram", speculative_tokens=3),
        "draft": build(tiny_dir, speculative=str(small_draft_dir)),
        "self_k5": build(tiny_dir, speculative=str(tiny_dir), speculative_tokens=5),
    }


def same(got, expected):
    """Same texts and tokens; log-probabilities within 1e-4 (one pass of k+1 tokens vs k+1 passes)."""
    assert [{k: v for k, v in g.items() if k != "logprobs"} for g in got] == \
        [{k: v for k, v in e.items() if k != "logprobs"} for e in expected]
    for g, e in zip(got, expected):
        if "logprobs" in e:
            assert len(g["logprobs"]) == len(e["logprobs"])
            assert all(abs(a - b) < 1e-4 for a, b in zip(g["logprobs"], e["logprobs"]))


NAMES = ["ngram", "ngram_k3", "draft", "self_k5"]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_completion_equals_plain(generator, speculators, name):
    """Five ragged prompts (two batches of at most 4), with logprobs and echo, and budgets of 40."""
    spec = speculators[name]
    for echo in (False, True):
        expected = generator.text_completion(PROMPTS, temperature=0, max_gen_len=40, logprobs=True, echo=echo)
        same(spec.text_completion(PROMPTS, temperature=0, max_gen_len=40, logprobs=True, echo=echo), expected)


def test_speculation_happens(generator, speculators):
    """The comparisons above are not vacuous: tokens were proposed and accepted, several per forward."""
    for name in NAMES:
        speculators[name].engine.speculative_stats.reset()
        speculators[name].text_completion(PROMPTS[:4], temperature=0, max_gen_len=25)
    stats = {n: speculators[n].engine.speculative_stats for n in NAMES}
    assert stats["self_k5"].acceptance_rate == 1.0
    assert stats["self_k5"].tokens_per_forward > 4
    assert stats["ngram"].proposed > 10 and stats["ngram"].accepted > 0
    assert stats["draft"].proposed > 10 and stats["draft"].acceptance_rate < 1
    assert generator.engine.speculative_stats is None


@pytest.mark.parametrize("name", NAMES)
def test_stop_ids_and_budgets_inside_accepted_runs(generator, speculators, name):
    """A stop id met in the middle of an accepted run, and budgets of 1..9, end rows exactly as plain."""
    spec = speculators[name]
    prompts = [[1, 45, 300, 12, 77, 45, 300, 12], [1, 7, 7, 7, 7], [1, 99, 100, 101, 99, 100]]
    plain, _ = generator.generate(prompts, max_gen_len=30, temperature=0)
    stop = plain[0][7]  # a token the first answer makes after a few steps
    for max_gen_len in (1, 2, 5, 9):
        for stop_token in (None, stop):
            expected = generator.generate(prompts, max_gen_len=max_gen_len, temperature=0, logprobs=True,
                                          stop_token=stop_token)
            got = spec.generate(prompts, max_gen_len=max_gen_len, temperature=0, logprobs=True, stop_token=stop_token)
            assert got[0] == expected[0], (max_gen_len, stop_token)
            for g, e in zip(got[1], expected[1]):
                assert all(abs(a - b) < 1e-4 for a, b in zip(g, e))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_infilling_chat_and_streams_equal_plain(generator, speculators, name):
    spec = speculators[name]
    for suffix_first in (False, True):
        same(spec.text_infilling([PREFIX, "x = 1\n"], [SUFFIX, "y = 2\n"], temperature=0, max_gen_len=30,
                                 logprobs=True, suffix_first=suffix_first),
             generator.text_infilling([PREFIX, "x = 1\n"], [SUFFIX, "y = 2\n"], temperature=0, max_gen_len=30,
                                      logprobs=True, suffix_first=suffix_first))
    same(spec.chat_completion([DIALOG, DIALOG[1:]], temperature=0, max_gen_len=30, logprobs=True),
         generator.chat_completion([DIALOG, DIALOG[1:]], temperature=0, max_gen_len=30, logprobs=True))
    # A stream's pieces may hold several tokens each (a step hands out every accepted one); the
    # text they join to is the plain stream's.
    streams = [(lambda g: g.text_completion_stream(PROMPTS[0], temperature=0, max_gen_len=40)),
               (lambda g: g.text_infilling_stream(PREFIX, SUFFIX, temperature=0, max_gen_len=30)),
               (lambda g: g.chat_completion_stream(DIALOG, temperature=0, max_gen_len=30))]
    for stream in streams:
        pieces = list(stream(spec))
        assert all(pieces) and "".join(pieces) == "".join(stream(generator))


def test_long_prompt_at_max_seq_len(generator, speculators):
    """A prompt near max_seq_len: proposals shrink to the room left, answers stay the same."""
    prompt = [1] + [45, 300, 12, 77] * 30
    for name in NAMES:
        expected = generator.generate([prompt, [1, 45]], max_gen_len=20, temperature=0)
        assert speculators[name].generate([prompt, [1, 45]], max_gen_len=20, temperature=0) == expected


def run_schedule(engine, prompts, budgets, drop_key=None):
    """Continuous batching as the server does it: rows 0 and 1 join, 3 steps, row 1 may be dropped,
    rows 2 and 3 join, then steps until every row is done. {key: tokens}."""
    batch = engine.open_batch([2], logprobs=True)
    out = {k: [] for k in range(len(prompts))}
    lps = {k: [] for k in range(len(prompts))}

    def take(updates):
        for u in updates:
            out[u.row] += u.tokens
            lps[u.row] += u.logprobs

    params = [SamplingParams(0.0, 1.0, b, True) for b in budgets]
    take(engine.admit(batch, [0, 1], prompts[:2], params[:2]))
    for _ in range(3):
        take(batch.step(sync=True))
    if drop_key is not None:
        batch.drop({drop_key})
        out.pop(drop_key)
    take(engine.admit(batch, [2, 3], prompts[2:], params[2:]))
    while batch:
        take(batch.step(sync=True))
    return out, lps


@pytest.mark.parametrize("name", ["ngram", "draft", "self_k5"])
def test_rows_joining_and_leaving_a_running_batch(generator, speculators, name):
    """The server's continuous batching (Engine.admit, Batch.step, Batch.drop) gives the plain tokens."""
    prompts = [[1, 45, 300, 12, 77, 45, 300], [1, 7, 8, 9], [1, 99, 100, 99, 100, 99, 100, 99], [1, 3]]
    budgets = [25, 30, 12, 20]
    for drop_key in (None, 1):
        expected, expected_lps = run_schedule(generator.engine, prompts, budgets, drop_key)
        got, got_lps = run_schedule(speculators[name].engine, prompts, budgets, drop_key)
        assert got == expected
        for k in got:
            assert all(abs(a - b) < 1e-4 for a, b in zip(got_lps[k], expected_lps[k]))


def test_compile_composes(generator, tiny_dir):
    """compile=True with speculation: same greedy answers (the verify step runs eagerly)."""
    spec = build(tiny_dir, speculative="ngram", compile=True)
    same(spec.text_completion(PROMPTS[:3], temperature=0, max_gen_len=30, logprobs=True),
         generator.text_completion(PROMPTS[:3], temperature=0, max_gen_len=30, logprobs=True))


@torch.inference_mode()
def test_model_per_row_positions_for_several_tokens(generator):
    """Feeding k+1 tokens per row at per-row positions gives the logits of feeding them one by one."""
    model = generator.model
    rows = [[1, 45, 300, 12, 77, 8], [1, 7, 8, 9, 10, 11, 12, 13, 14]]
    lengths = [3, 6]  # each row's cached prefix before the 3 new tokens
    expected = [model.forward(torch.tensor([r[: n + 3]]), 0)[0, n:] for r, n in zip(rows, lengths)]
    model.reserve_cache(2, 16)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        model.hidden(torch.tensor([r[:n]], device=model.device), 0, rows=slice(b, b + 1))
        # Garbage past the prefix, as rejected tokens leave it: the position-based mask hides it.
        model.hidden(torch.tensor([[5] * 4], device=model.device), n, rows=slice(b, b + 1))
    tokens = torch.tensor([r[n : n + 3] for r, n in zip(rows, lengths)], device=model.device)
    logits = model.logits(model.hidden(tokens, torch.tensor(lengths, device=model.device)))
    for b in range(2):
        torch.testing.assert_close(logits[b], expected[b], atol=1e-4, rtol=0)


# Sampling: the distribution is the target's ------------------------------------------------------

BASE = [1, 45, 300, 12, 77, 45, 300, 12, 77, 45, 300]
SAMPLE_PROMPT = BASE + [53, 458, 347, 99] + BASE[1:]  # the model's likely continuation is in the prompt
TEMPERATURE, TOP_P, NEW, SAMPLES = 0.5, 0.8, 4, 1024
ALPHA = 1e-3  # significance level: a sampler fails when its p-value is below it


def nucleus_probs(logits: torch.Tensor) -> torch.Tensor:
    """The plain sampler's distribution, written independently: softmax(l / T), then the smallest
    set of most likely tokens whose probabilities exceed TOP_P (float64)."""
    probs = torch.softmax(logits.double() / TEMPERATURE, dim=-1)
    ordered, index = probs.sort(dim=-1, descending=True)
    ordered[ordered.cumsum(-1) - ordered > TOP_P] = 0
    kept = torch.zeros_like(probs).scatter(-1, index, ordered)
    return kept / kept.sum(-1, keepdim=True)


def exact_probabilities(generator, sequences) -> dict:
    """P(sequence of NEW tokens | SAMPLE_PROMPT) under the plain sampler, from the target's logits."""
    out, seqs = {}, sorted(sequences)
    n = len(SAMPLE_PROMPT)
    for i in range(0, len(seqs), 4):
        chunk = seqs[i : i + 4]
        logits = generator.model.forward(torch.tensor([SAMPLE_PROMPT + list(s[:-1]) for s in chunk]), 0)
        probs = nucleus_probs(logits[:, n - 1 :])  # (B, NEW, V)
        for s, p in zip(chunk, probs):
            out[s] = math.prod(p[j, t].item() for j, t in enumerate(s))
    return out


def chi_square_p(counts: Counter, probs: dict, total: int) -> float:
    """Goodness of fit: bins are the sequences expected at least 5 times, plus one for all others."""
    bins = [s for s, p in probs.items() if total * p >= 5]
    observed = [counts[s] for s in bins] + [total - sum(counts[s] for s in bins)]
    expected = [total * probs[s] for s in bins] + [total * (1 - sum(probs[s] for s in bins))]
    assert len(bins) >= 5 and expected[-1] >= 5, "too few bins for a chi-square test"
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


def samples(generator) -> Counter:
    generator.engine.rng.manual_seed(1234)
    out = []
    for _ in range(SAMPLES // 64):
        tokens, _ = generator.generate([SAMPLE_PROMPT] * 64, max_gen_len=NEW, temperature=TEMPERATURE, top_p=TOP_P)
        out += [tuple(t) for t in tokens]
    assert all(len(t) == NEW for t in out)  # the tiny model's EOS is rare: every sample has NEW tokens
    return Counter(out)


@pytest.fixture(scope="module")
def sampling_generators(tiny_dir, near_draft_dir):
    def big(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the near draft is as large as the target
            return Llama.build(str(tiny_dir), max_seq_len=64, max_batch_size=64, device=DEVICE, dtype="float32",
                               **kw)

    return {"plain": big(), "ngram": big(speculative="ngram"), "draft": big(speculative=str(near_draft_dir))}


def test_sampling_distribution_is_the_targets(sampling_generators, monkeypatch):
    """1024 samples of 4 tokens each (seeded): the plain sampler, prompt lookup and a draft model all
    fit the exact distribution (p >= 0.001); accepting every draft token does not (p < 0.001)."""
    gens = sampling_generators
    counts = {name: samples(g) for name, g in gens.items()}
    for name in ("ngram", "draft"):  # the rule was exercised: both acceptances and rejections
        stats = gens[name].engine.speculative_stats
        assert 0.1 < stats.acceptance_rate < 0.95, (name, stats)
    monkeypatch.setattr(speculative, "accept_mask", lambda p, q, u: torch.ones_like(p, dtype=torch.bool))
    broken = {f"broken_{name}": samples(gens[name]) for name in ("ngram", "draft")}
    seen = set().union(*counts.values(), *broken.values())
    probs = exact_probabilities(gens["plain"], seen)
    p_values = {name: chi_square_p(c, probs, SAMPLES) for name, c in {**counts, **broken}.items()}
    print("chi-square p-values:", p_values)
    for name in counts:
        assert p_values[name] >= ALPHA, p_values
    for name in broken:
        assert p_values[name] < ALPHA, p_values


# Model parallelism -----------------------------------------------------------------------------

def test_mp2_equals_plain_mp1(tiny_dir, tiny_mp2_dir, tmp_path_factory):
    """Two processes, the target and a small draft both split in two, and prompt lookup on two
    processes: every rank agrees, and greedy answers equal one process without speculation."""
    draft = write_tiny_model(tmp_path_factory.mktemp("draft_mp2"), mp=2, n_layers=1, seed=3)
    out = tmp_path_factory.mktemp("spec_mp2")
    run = torchrun(ROOT / "tests" / "mp_speculative.py", out, tiny_mp2_dir, draft)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    expected = json.loads(json.dumps(mp_requests.answers(str(tiny_dir))))
    for name in ("ngram", "draft"):
        got = ranks[0][name]
        for request in expected:
            if request.endswith("stream"):  # pieces may hold several tokens: compare the text
                assert "".join(got[request]) == "".join(expected[request])
            elif request not in ("sampled", "logits"):  # sampling draws differently (same distribution,
                # tested above); raw logits of model.forward are compared by test_distributed
                assert_same_answers(got[request], expected[request])
        assert got["stats"]["proposed"] > 0


# Bad input -------------------------------------------------------------------------------------

def test_bad_speculative_values(tiny_dir, tiny_step_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match='pass "ngram"'):
        build(tiny_dir, speculative="n-gram")
    for missing in (str(tmp_path / "missing"), ""):
        with pytest.raises(FileNotFoundError, match="no such draft checkpoint"):
            build(tiny_dir, speculative=missing)
    with pytest.raises(TypeError, match="speculative must be"):
        build(tiny_dir, speculative=3)
    for k in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="speculative_tokens must be an int >= 1"):
            build(tiny_dir, speculative="ngram", speculative_tokens=k)
    with pytest.raises(ValueError, match="speculative_tokens is set but speculative is not"):
        build(tiny_dir, speculative_tokens=4)
    other = write_tiny_model(tmp_path / "other_vocab", vocab_size=400)
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        build(tiny_dir, speculative=str(other))
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        build(tiny_dir, speculative=str(tiny_step_dir))  # another tokenizer, possibly of the same size


def test_draft_not_smaller_warns(tiny_dir):
    with pytest.warns(UserWarning, match="not smaller than the target"):
        Llama.build(str(tiny_dir), max_seq_len=32, max_batch_size=1, device=DEVICE, dtype="float32",
                    speculative=str(tiny_dir))


def test_adaptive_k():
    """k grows by 2 to 15 on full acceptance, shrinks to accepted + 1; one miss alone does not rest a
    row, two or more in a row make it rest 2, 4, .. 16 steps."""
    assert speculative.adapt_k(4, 0, 4, 4) == (6, 0, 0)
    assert speculative.adapt_k(14, 0, 14, 14) == (15, 0, 0)
    assert speculative.adapt_k(15, 0, 15, 15) == (15, 0, 0)
    assert speculative.adapt_k(6, 0, 6, 2) == (3, 0, 0)
    assert speculative.adapt_k(3, 0, 3, 0) == (1, 1, 0)
    assert speculative.adapt_k(1, 1, 1, 0) == (1, 2, 2)
    assert speculative.adapt_k(1, 2, 1, 0) == (1, 3, 4)
    assert speculative.adapt_k(1, 6, 1, 0) == (1, 7, 16)
    assert speculative.adapt_k(1, 6, 1, 1) == (3, 0, 0)


def longest_match_lookup(history, k, sizes=(3, 2), context=speculative.MAX_CONTEXT):
    """Prompt lookup written another way: the longest suffix of history, n + c tokens (n from sizes,
    longest first; c <= context), that occurs earlier followed by a token, its latest occurrence;
    then its continuation extended token by token from the growing text (LZ77's overlapping copy)."""
    for n in sizes:
        for length in range(n + context, n - 1, -1):
            if length > len(history) - 1:
                continue
            suffix = history[-length:]
            starts = [i for i in range(len(history) - length) if history[i : i + length] == suffix]
            if starts:
                src, text = starts[-1] + length, list(history)
                for t in range(k):
                    text.append(text[src + t])
                return text[len(history) :]
    return []


def test_ngram_lookup_against_references():
    """lookup (a scan) against longest_match_lookup, and NgramIndex (incremental) against lookup, on
    growing random histories; then hand-built cases."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        history, index = [], speculative.NgramIndex()
        for _ in range(60):
            history += torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            expected = longest_match_lookup(history, 5)
            assert speculative.lookup(history, 5) == expected, history
            assert index.lookup(history, 5) == expected, history
    # [1, 2, 3] twice before the end: after 5 (as at the end) and after 7, which is later.
    assert speculative.lookup([5, 1, 2, 3, 8, 7, 1, 2, 3, 9, 5, 1, 2, 3], 2) == [8, 7]
    assert speculative.lookup([7, 1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3], 2) == [8, 5]  # equal agreement: the latest
    assert speculative.lookup([1, 2, 3, 4, 2, 3], 3) == [4, 2, 3]  # 3-gram absent, 2-gram found
    assert speculative.lookup([4, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # the copy goes on past the end
    assert speculative.lookup([1, 2, 3, 4], 3) == []


def test_ngram_lookup_compares_a_bounded_number_of_occurrences():
    """Of more than MAX_OCCURRENCES occurrences, the latest MAX_OCCURRENCES are compared: a better
    agreeing one before them is not found (the cost of a lookup stays bounded), in the index too."""
    m = speculative.MAX_OCCURRENCES
    history = [5, 1, 2, 3, 8] + [7, 1, 2, 3, 9] * m + [5, 1, 2, 3]
    assert speculative.lookup(history, 1) == [9]
    assert speculative.NgramIndex().lookup(history, 1) == [9]
    history = [5, 1, 2, 3, 8] + [7, 1, 2, 3, 9] * (m - 1) + [5, 1, 2, 3]
    assert speculative.lookup(history, 1) == [8]
    assert speculative.NgramIndex().lookup(history, 1) == [8]


# Command lines ---------------------------------------------------------------------------------

def test_example_script_with_speculative_flags(tiny_dir):
    """example_infilling.py --speculative ngram --speculative_tokens 3 prints what it prints without."""
    from test_examples import example, python

    plain = example("example_infilling.py", tiny_dir, mp=1)
    args = ["example_infilling.py", "--ckpt_dir", tiny_dir, "--tokenizer_path", tiny_dir / "tokenizer.model",
            "--temperature", "0", "--max_gen_len", "8", "--speculative", "ngram", "--speculative_tokens", "3"]
    run = python(*[ROOT / args[0], *args[1:]])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == plain


def test_server_with_speculative_flag(tiny_dir, small_draft_dir, generator):
    """python -m llama.server --speculative DRAFT: concurrent greedy completions (continuous
    batching: 4 requests on 2 rows) equal the plain generator's."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from concurrent.futures import ThreadPoolExecutor

    from servers import free_port, server_cmd, start, stop
    from test_server import expected_completion

    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 2,
                            "--speculative", small_draft_dir, "--speculative_tokens", 2), port)
    try:
        def ask(prompt):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"prompt": prompt, "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(4) as pool:  # 4 requests, 2 rows: rows join a running batch
            answers = list(pool.map(ask, PROMPTS[:4]))
        assert answers == [expected_completion(generator, p, 16) for p in PROMPTS[:4]]
        # what speculation does not apply is refused, naming the field; /metrics shows its statistics
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "x", "max_tokens": 4, "temperature": 1, "seed": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        from prometheus_client import parser

        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
        got = {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples}
        assert 0 <= got["llama_speculative_acceptance_rate"] <= 1
        assert 1 <= got["llama_speculative_tokens_per_forward"] <= 3  # at most k + 1 = 3 per forward
    finally:
        assert stop(proc) == 0
