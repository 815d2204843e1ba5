"""The prefix cache (llama.prefix_cache) and chunked prefill beside decode (llama.chunked_prefill,
the server's scheduler): the block store's own behaviour, then greedy answers equal with and
without them, in the library, through the server, and under torchrun with two ranks."""

import os
import random
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from device import DEVICE, need_processes
from llama import Llama
from llama.model import KVCache, ModelArgs
from llama.prefix_cache import BLOCK, PrefixCache
from llama.sampling import SamplingParams

ARGS = ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, max_batch_size=2, max_seq_len=256)


def filled_cache(seed: int) -> KVCache:
    """A 2-row cache of random keys and values."""
    cache = KVCache(ARGS, 1, torch.float32, torch.device("cpu"))
    cache.reserve(2, 256)
    g = torch.Generator().manual_seed(seed)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


def block_bytes() -> int:
    return 2 * ARGS.n_layers * 1 * BLOCK * ARGS.head_dim * 4


def tokens(n, seed=0):
    r = random.Random(seed)
    return [r.randrange(3, 500) for _ in range(n)]


# The block store -----------------------------------------------------------------------------

def test_longest_prefix_match_in_whole_blocks_short_of_the_last_token():
    pc, cache = PrefixCache(100 * block_bytes()), filled_cache(0)
    a = tokens(40)
    pc.store(a, cache, 1)
    assert pc.blocks == 2  # 40 tokens: two whole blocks, the last 8 are not kept
    assert pc.match(a + [7, 8]).length == 32
    assert pc.match(a[:33]).length == 32
    assert pc.match(a[:32]).length == 16, "the prompt's last token is always run"
    assert pc.match(a[:20] + [a[20] + 1] + a[21:]).length == 16, "a different token ends the match"
    assert pc.match([a[0] + 1] + a[1:]).length == 0
    assert (pc.lookups, pc.hit_tokens) == (5, 32 + 32 + 16 + 16)

    other = filled_cache(1)
    pc.match(a + [1]).load(other, 0)
    for mine, theirs in zip(cache.k + cache.v, other.k + other.v):
        assert torch.equal(theirs[0, :, :32], mine[1, :, :32])
        assert not torch.equal(theirs[0, :, 32:40], mine[1, :, 32:40])


def test_blocks_are_indexed_by_their_whole_prefix():
    pc, cache = PrefixCache(100 * block_bytes()), filled_cache(0)
    a = tokens(32, seed=1)
    b = tokens(16, seed=2) + a[16:32]  # the same second block after a different first one
    pc.store(a, cache, 0)
    assert pc.match(b + [1]).length == 0
    pc.store(b, cache, 1)
    assert pc.blocks == 4
    assert pc.match(a + [1]).length == 32 and pc.match(b + [1]).length == 32


def test_least_recently_used_leaf_is_evicted_first():
    pc, cache = PrefixCache(3 * block_bytes()), filled_cache(0)
    a, b, c = tokens(16, 1), tokens(16, 2), tokens(16, 3)
    pc.store(a, cache, 0)
    pc.store(b, cache, 0)
    pc.store(c, cache, 0)
    pc.match(a + [1])  # a is now the most recent: b is the oldest
    pc.store(tokens(16, 4), cache, 0)
    assert [pc.peek(x + [1]) for x in (a, b, c)] == [16, 0, 16]
    pc.store(tokens(16, 5), cache, 0)
    assert [pc.peek(x + [1]) for x in (a, b, c)] == [16, 0, 0]
    assert pc.evicted_blocks == 2


def test_a_kept_block_keeps_its_whole_prefix():
    pc, cache = PrefixCache(3 * block_bytes()), filled_cache(0)
    a = tokens(48, 1)
    pc.store(a, cache, 0)  # three blocks: the first is the oldest, but two others continue it
    pc.store(tokens(16, 2), cache, 0)
    assert pc.peek(a + [1]) == 32, "the chain's last block went, not its first"


def test_budget_is_never_exceeded_and_chains_stay_whole():
    r = random.Random(0)
    for budget_blocks in (0, 1, 2, 5):
        pc, cache = PrefixCache(budget_blocks * block_bytes() + 100), filled_cache(0)
        stems = [tokens(64, s) for s in range(4)]
        for i in range(200):
            t = r.choice(stems)[: r.randrange(1, 64)] + tokens(r.randrange(0, 40), 100 + i)
            if r.random() < 0.5:
                pc.store(t[:250], cache, r.randrange(2))
            else:
                pc.match(t)
            assert pc.nbytes <= pc.budget_bytes and pc.blocks <= budget_blocks
            held = set(pc.lru)
            assert all(b.parent is None or b.parent.serial in held for b in pc.lru.values())
            assert len(pc.index) == pc.blocks


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="prefix cache budget"):
        PrefixCache(-1)


# The library ---------------------------------------------------------------------------------

def ragged_prompts():
    """Prompts of many lengths that share prefixes (and prompts that equal a shared stem)."""
    r = random.Random(3)
    stem = [1] + [r.randrange(3, 300) for _ in range(70)]
    return [stem[:n] + [r.randrange(3, 300) for _ in range(k)]
            for n, k in [(40, 3), (70, 10), (17, 0), (33, 20), (71, 1), (5, 2), (64, 0), (48, 9)]]


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return Llama.build(str(tiny_dir), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32")


@pytest.mark.parametrize("mb, chunk", [(1, 2048), (1, 7), (0.025, 5)])
def test_library_answers_equal_with_the_prefix_cache(tiny_dir, plain, mb, chunk):
    cached = Llama.build(str(tiny_dir), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32",
                         prefix_cache_mb=mb, prefill_chunk_size=chunk)
    prompts = ragged_prompts()
    want = plain.generate(prompts, max_gen_len=12, temperature=0)[0]
    for _ in range(2):  # the second time, every prompt finds its prefix
        assert cached.generate(prompts, max_gen_len=12, temperature=0)[0] == want
    pc = cached.engine.prefix_cache
    assert pc.hit_tokens > 0 and pc.nbytes <= pc.budget_bytes
    if mb < 1:
        assert pc.evicted_blocks > 0, "the tiny budget evicts"
    # Prompt log-probabilities need every position: the cache steps aside, the answers stay the same.
    got = cached.generate(prompts[:3], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    ref = plain.generate(prompts[:3], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    assert got[0] == ref[0]
    assert all(abs(x - y) < 1e-4 for u, v in zip(got[1], ref[1]) for x, y in zip(u, v))


def test_a_finished_answer_is_cached_for_the_next_turn(tiny_dir, plain):
    """A follow-up that repeats the prompt and its answer finds both in the cache."""
    cached = Llama.build(str(tiny_dir), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32",
                         prefix_cache_mb=1)
    prompt = ragged_prompts()[0]  # 43 tokens
    answer = cached.generate([prompt], max_gen_len=30, temperature=0, stop_token=-1)[0][0]
    assert answer == plain.generate([prompt], max_gen_len=30, temperature=0, stop_token=-1)[0][0]
    follow = prompt + answer + [5, 6, 7]
    before = cached.engine.prefix_cache.hit_tokens
    got = cached.generate([follow], max_gen_len=10, temperature=0)[0]
    # positions 0..71 were fed (the 30th answer token never is): 4 whole blocks
    assert cached.engine.prefix_cache.hit_tokens - before == 64
    assert got == plain.generate([follow], max_gen_len=10, temperature=0)[0]


def test_library_is_off_by_default(plain):
    assert plain.engine.prefix_cache is None
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        Llama(plain.model, plain.tokenizer, prefix_cache_mb=-1)


@pytest.mark.parametrize("mb", [0, 1])
def test_staged_prefill_between_decode_steps_gives_the_same_answers(tiny_dir, plain, mb):
    """A long prompt prefilled 6 tokens per step while two rows decode, then joining."""
    g = Llama.build(str(tiny_dir), max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32",
                    prefix_cache_mb=mb, prefill_chunk_size=6)
    engine, prompts = g.engine, ragged_prompts()
    long_prompt, short = prompts[1], prompts[:1] + prompts[3:4]
    params = SamplingParams(0.0, 1.0, 12, False)
    stop = [g.tokenizer.eos_id]
    want = [x.tokens for x in plain.engine.complete(short + [long_prompt], params, stop)]
    if mb:  # a prefix of the long prompt is cached already
        engine.complete([long_prompt[:40]], params, stop)
    batch = engine.open_batch(stop, logprobs=False)
    out = {0: [], 1: [], 2: []}
    for u in engine.admit(batch, [0, 1], short, [params] * 2):
        out[u.row] += u.tokens
    staged, chunks = engine.start_prefill(long_prompt, 6), 0
    while batch or staged is not None:
        if staged is not None and staged.remaining <= 6:
            engine.admit(batch, [2], [long_prompt], [params], prefixes=[staged])
            staged = None
        elif staged is not None:
            staged.step()
            chunks += 1
        if batch:
            for u in batch.step(sync=True):
                out[u.row] += u.tokens
    assert [out[0], out[1], out[2]] == want
    assert chunks >= (70 - 40 * mb) // 6 - 1, "the long prompt went in chunks, between decode steps"


def test_model_parallel_library_with_prefix_cache(tiny_mp2_dir, plain, tmp_path):
    """torchrun --nproc_per_node 2: both ranks give the one-process answers and hold alike blocks."""
    import json
    import subprocess

    from device import subprocess_env

    need_processes(2)
    prompts = ragged_prompts()
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/mp_prefix.py", str(tmp_path), str(tiny_mp2_dir), str(tmp_path / "prompts.json")]
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    want = plain.generate(prompts, max_gen_len=12, temperature=0)[0]
    assert ranks[0]["answers"] == ranks[1]["answers"] == [want, want]
    assert ranks[0]["stats"] == ranks[1]["stats"] and ranks[0]["stats"]["evicted_blocks"] > 0


# The server ----------------------------------------------------------------------------------

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from servers import free_port, output, server_cmd, start, stop  # noqa: E402

TEXT = ("def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
        "class Stack:\n    def __init__(self):\n        self.items = []\n")


def server_prompts():
    """Ragged prompts sharing the text's prefixes, the long one past several chunks."""
    other = "SELECT name, email FROM users WHERE age > 30 ORDER BY name LIMIT 10; -- the users"
    return [TEXT[:n] for n in (20, 60, 110, 150, 190)] + ["import os", TEXT[:190] + "x = 1", other]


def expected(generator, prompt, n):
    tok = generator.tokenizer
    out = generator.generate([tok.encode(prompt, True, False)], n, temperature=0, stop_token=-1)[0][0]
    stops = {tok.eos_id, tok.eot_id, tok.step_id}
    return tok.decode(next((out[:i] for i, t in enumerate(out) if t in stops), out))


def ask_all(port, prompts, n=10):
    """Streamed answers, the first request decoding before the others are sent (so that they join
    a running batch: long prompts in chunks)."""
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    model = c.models.list().data[0].id  # the name the server gives itself
    started = threading.Event()

    def ask(p, first=False):  # streamed, as an editor asks
        text = []
        for ch in c.completions.create(model=model, prompt=p, max_tokens=n if not first else 120, temperature=0,
                                       stream=True, stop=None):
            started.set()
            text.append(ch.choices[0].text)
        started.set()
        return "".join(text)

    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        first = pool.submit(ask, "import os", True)
        started.wait(60)
        answers = list(pool.map(ask, prompts))
        first.result()
    return answers


def prefix_stats(port, name="prefix_cache"):
    return httpx.get(f"http://127.0.0.1:{port}/stats").json()[name]


@pytest.mark.parametrize("flags", [["--prefix_cache_mb", 1, "--prefill_chunk", 8],
                                   ["--prefix_cache_mb", 0.025, "--prefill_chunk", 5],
                                   ["--prefix_cache_mb", 0, "--prefill_chunk", 8]])
def test_server_answers_equal_with_prefix_cache_and_chunked_prefill(tiny_dir, generator, flags):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 4, *flags), port)
    try:
        prompts = server_prompts()
        want = [expected(generator, p, 10) for p in prompts]
        assert ask_all(port, prompts) == want
        assert ask_all(port, prompts[::-1]) == want[::-1]  # again: the prefixes are cached now
        assert prefix_stats(port, "prefill_chunks") > 0, "long prompts were prefilled in chunks beside the batch"
        pc = prefix_stats(port)
        if flags[1] == 0:
            assert pc is None
        else:
            assert pc["hit_tokens"] > 0 and pc["bytes"] <= pc["budget_bytes"]
            assert (pc["evicted_blocks"] > 0) == (flags[1] < 1)
    finally:
        assert stop(proc) == 0, output(proc)[-2000:]


def test_server_prefix_cache_is_on_by_default(tiny_dir):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 4), port)
    try:
        pc = prefix_stats(port)
        assert pc is not None and pc["budget_bytes"] > 0
    finally:
        assert stop(proc) == 0


def test_server_refuses_a_negative_budget(tiny_dir):
    import subprocess

    r = subprocess.run(server_cmd(tiny_dir, free_port(), "--prefix_cache_mb", -1), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "--prefix_cache_mb must be >= 0" in r.stderr
    r = subprocess.run(server_cmd(tiny_dir, free_port(), "--prefill_chunk", 0), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "--prefill_chunk must be a positive number" in r.stderr


def test_model_parallel_server_with_prefix_cache_and_chunks(tiny_mp2_dir, generator):
    """torchrun --nproc_per_node 2: both ranks take the same prefix-cache and chunk decisions."""
    need_processes(2)
    port = free_port()
    cmd = server_cmd(tiny_mp2_dir, port, "--max_seq_len", 256, "--max_batch_size", 4, "--prefix_cache_mb", 0.025,
                     "--prefill_chunk", 6)
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]], port)
    try:
        prompts = server_prompts()
        want = [expected(generator, p, 10) for p in prompts]
        assert ask_all(port, prompts) == want
        assert ask_all(port, prompts[::-1]) == want[::-1]
        assert prefix_stats(port)["hit_tokens"] > 0 and prefix_stats(port, "prefill_chunks") > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    out = output(proc)
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-2000:]
