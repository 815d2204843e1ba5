"""Serving throughput and latency: python -m llama.server under 1, 4 and 8 concurrent clients,
and an editor's replay.

    python benchmarks/server.py [--shape cpu] [--requests 24] [--max_tokens 32]
    python benchmarks/server.py --editor [--file_tokens 2000] [--editor_requests 30] [--long_tokens 4096]

Writes a random checkpoint of the chosen shape (the 168M-parameter CPU shape by default), starts
the server on 127.0.0.1 with max_batch_size 8, and for each number of clients sends --requests
completion requests (greedy, prompts of 20 to 100 tokens), each client one request at a time.
Reports requests/s, generated tokens/s and the p50/p95 latency of a request.

--editor: first times one prefill chunk of each size of --chunk_sizes in process (the model at
mid-prompt of a --long_tokens prompt), then runs, on a server with the prefix cache and on one
without (--prefix_cache_mb 0), one after the other:
- an editor: --editor_requests sequential fill-in-the-middle requests over a growing source file
  (the previous prefix plus a few lines, a new suffix; streamed, 16 new tokens), reaching about
  --file_tokens tokens; then 4 such editors at once (each its own file). Time to first token
  (p50, p95, the first request's, and the same full-size request again), generated tokens/s.
- a long prompt during decode: one stream runs while a --long_tokens prompt is sent; the longest
  gap between the stream's chunks until the long prompt's first token, against one chunk's time.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from generate import SHAPES  # noqa: E402
from llama import Llama  # noqa: E402
from llama.tiny import write_tiny_model  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

WORDS = "def class return import for while if else self value items list dict print sum range len".split()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES) + ["tiny"], default="cpu", help="tiny: a smoke test's model")
    parser.add_argument("--editor", action="store_true", help="the editor replay instead of the client levels")
    parser.add_argument("--file_tokens", type=int, default=2000)
    parser.add_argument("--editor_requests", type=int, default=30)
    parser.add_argument("--long_tokens", type=int, default=4096)
    parser.add_argument("--prefill_chunk", type=int, default=None, help="the servers' --prefill_chunk (default theirs)")
    parser.add_argument("--chunk_sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8391)
    a = parser.parse_args()
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_model(Path(tmp) / "model", **SHAPES.get(a.shape, {}))
        if a.editor:
            return editor_replay(ckpt, a)
        proc = subprocess.Popen([sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt), "--port", str(a.port),
                                 "--max_seq_len", "512", "--max_batch_size", "8"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            run(url, a)
        finally:
            proc.terminate()
            proc.wait()


def run(url, a):
    def prompt(i):
        n = 20 + (i * 37) % 80
        return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))

    def ask(i):
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", timeout=600,
                       json={"prompt": prompt(i), "max_tokens": a.max_tokens, "temperature": 0}).json()
        return time.perf_counter() - start, r["usage"]["completion_tokens"]

    ask(0)  # warm up
    print(f"shape {a.shape}, {a.requests} requests of up to {a.max_tokens} new tokens per level, max_batch_size 8")
    print("| clients | requests/s | generated tokens/s | latency p50 (s) | latency p95 (s) | rows per decode step |")
    print("|---|---|---|---|---|---|")
    for clients in (1, 4, 8):
        before = httpx.get(f"{url}/stats").json()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, range(a.requests)))
        wall = time.perf_counter() - start
        after = httpx.get(f"{url}/stats").json()["steps_by_batch_size"]
        steps = {int(k): v - before["steps_by_batch_size"].get(k, 0) for k, v in after.items()}
        latencies = sorted(t for t, _ in results)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        print(f"| {clients} | {len(results) / wall:.2f} | {sum(n for _, n in results) / wall:.1f} | "
              f"{statistics.median(latencies):.2f} | {p95:.2f} | "
              f"{sum(k * v for k, v in steps.items()) / max(1, sum(steps.values())):.1f} |", flush=True)


# The editor replay --------------------------------------------------------------------------------

def source_lines(seed: int):
    """An endless Python source file, line by line (different for each seed)."""
    i = 0
    while True:
        name = WORDS[(i * 5 + seed) % len(WORDS)]
        if i % 6 == 0:
            yield f"def {name}_{seed}_{i}(items, value):\n"
        elif i % 6 == 5:
            yield f"    return total_{i} + value\n\n"
        else:
            yield f"    total_{i} = sum(x * {i % 13} for x in items if x != {name!r})\n"
        i += 1


def editor_requests(tokenizer, seed: int, file_tokens: int, requests: int, lines_per_request: int = 2):
    """(prefix, suffix) of each request: the cursor moves down the file a few lines at a time,
    the last prefix about file_tokens tokens long; the suffix is the few lines after the cursor."""
    lines, gen = [], source_lines(seed)
    while len(tokenizer.encode("".join(lines), True, False)) < file_tokens:
        lines.append(next(gen))
    end = len(lines)
    out = []
    for r in range(requests):
        cut = max(1, end - (requests - 1 - r) * lines_per_request)
        out.append(("".join(lines[:cut]), "".join(lines[cut : cut + 3]) if cut < len(lines) else next(gen)))
    return out


def stream_times(url, body, until=None, started=None):
    """(seconds to the first streamed chunk, the arrival time of every chunk, text) of one request;
    until: an Event that ends the request early (the client hangs up); started: an Event set at
    the first chunk."""
    start = time.perf_counter()
    arrivals, text = [], []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=3600) as r:
        for line in r.iter_lines():
            if until is not None and until.is_set():
                break
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.perf_counter())
                if started is not None:
                    started.set()
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return arrivals[0] - start if arrivals else float("nan"), arrivals, "".join(text)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_editor(url, tokenizer, seed, a):
    """One editor's requests in turn: (times to first token, generated tokens, seconds)."""
    ttfts, tokens, start = [], 0, time.perf_counter()
    for prefix, suffix in editor_requests(tokenizer, seed, a.file_tokens, a.editor_requests):
        ttft, _, text = stream_times(url, {"prompt": prefix, "suffix": suffix, "max_tokens": 16, "temperature": 0})
        ttfts.append(ttft)
        tokens += len(tokenizer.encode(text, False, False))
    return ttfts, tokens, time.perf_counter() - start


def long_prompt_gaps(url, tokenizer, a):
    """The longest and the median gap between a running stream's chunks while a long prompt is
    admitted (until its first token), and that prompt's time to first token."""
    result = {}
    words = " ".join(WORDS[(k * 7) % len(WORDS)] + str(k) for k in range(a.long_tokens))
    ids = tokenizer.encode(words, True, False)[: a.long_tokens]
    long_prompt = tokenizer.decode(ids)

    done, started = threading.Event(), threading.Event()
    # Random weights may end an answer early: stream a prompt whose greedy answer runs its whole budget.
    candidates = ["def main():"] + [" ".join(WORDS[k:k + 4]) for k in range(0, len(WORDS) - 4)]
    stream_prompt = next((p for p in candidates if httpx.post(f"{url}/v1/completions", timeout=3600, json={
        "prompt": p, "max_tokens": 300, "temperature": 0}).json()["choices"][0]["finish_reason"] == "length"),
        candidates[0])

    def running():
        result["stream"] = stream_times(url, {"prompt": stream_prompt, "max_tokens": 1000, "temperature": 0}, done,
                                        started)[1]

    def long_one():
        t0 = time.perf_counter()
        result["long"] = (t0, t0 + stream_times(url, {"prompt": long_prompt, "max_tokens": 1, "temperature": 0})[0])
        done.set()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(running)
        started.wait(600)
        time.sleep(0.5)  # a few steps of the stream before the long prompt arrives
        pool.submit(long_one).result()
        first.result()
    return result


def editor_replay(ckpt, a):
    tokenizer = Tokenizer(str(ckpt / "tokenizer.model"))
    chunk_times = time_chunks(ckpt, a)
    rows = {}
    for label, flags in (("on", []), ("off", ["--prefix_cache_mb", "0"])):
        port = a.port + (label == "off")
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt), "--port", str(port), "--dtype", "float32",
               "--max_seq_len", str(max(a.long_tokens, a.file_tokens) + 1024), "--max_batch_size", "8", *flags]
        if a.prefill_chunk:
            cmd += ["--prefill_chunk", str(a.prefill_chunk)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url)
            stream_times(url, {"prompt": "warm up", "max_tokens": 2, "temperature": 0})
            one = run_editor(url, tokenizer, 0, a)
            last = editor_requests(tokenizer, 0, a.file_tokens, a.editor_requests)[-1]
            again = stream_times(url, {"prompt": last[0], "suffix": last[1], "max_tokens": 16, "temperature": 0})[0]
            with ThreadPoolExecutor(4) as pool:
                start = time.perf_counter()
                four = list(pool.map(lambda e: run_editor(url, tokenizer, 1 + e, a), range(4)))
                wall4 = time.perf_counter() - start
            gaps = long_prompt_gaps(url, tokenizer, a)
        finally:
            proc.terminate()
            proc.wait()
        rows[label] = (one, again, four, wall4, gaps)
    chunk = a.prefill_chunk or 512
    print(f"\nshape {a.shape}, float32 CPU, torch {torch.__version__}, {a.editor_requests} requests per editor "
          f"up to {a.file_tokens} tokens, prefill chunk {chunk}")
    print("| prefix cache | editors | TTFT first (s) | TTFT p50 (s) | TTFT p95 (s) | p95/p50 | TTFT full size again (s) "
          "| generated tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (one, again, four, wall4, _) in rows.items():
        t = one[0]
        print(f"| {label} | 1 | {t[0]:.3f} | {statistics.median(t):.3f} | {percentile(t, 0.95):.3f} | "
              f"{percentile(t, 0.95) / statistics.median(t):.2f} | {again:.3f} | {one[1] / one[2]:.1f} |")
        t4 = [x for e in four for x in e[0]]
        print(f"| {label} | 4 | {statistics.median([e[0][0] for e in four]):.3f} | {statistics.median(t4):.3f} | "
              f"{percentile(t4, 0.95):.3f} | {percentile(t4, 0.95) / statistics.median(t4):.2f} | | "
              f"{sum(e[1] for e in four) / wall4:.1f} |")
    on, off = rows["on"], rows["off"]
    print(f"\nwarm TTFT (the full-size request again, cache on) / cold TTFT (cache off, same request): "
          f"{on[1]:.3f} / {off[1]:.3f} = {on[1] / off[1]:.0%}")
    one_chunk = chunk_times.get(chunk)
    print(f"\nlong prompt ({a.long_tokens} tokens) admitted while a stream decodes; one {chunk}-token chunk "
          f"takes {one_chunk if one_chunk is None else f'{one_chunk:.3f}'} s in process")
    print("| prefix cache | longest gap (s) | median gap (s) | longest gap / one chunk | long prompt's TTFT (s) |")
    print("|---|---|---|---|---|")
    for label, (*_, gaps) in rows.items():
        t0, t1 = gaps["long"]
        window = [b - a_ for a_, b in zip(gaps["stream"], gaps["stream"][1:]) if b >= t0 and a_ <= t1]
        if not window:
            print(f"| {label} | (the stream ended before the long prompt's first token) | | | |")
            continue
        ratio = f"{max(window) / one_chunk:.2f}" if one_chunk else "?"
        print(f"| {label} | {max(window):.3f} | {statistics.median(window):.3f} | {ratio} | {t1 - t0:.2f} |")


def wait_ready(url):
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def time_chunks(ckpt, a):
    """Seconds of one prefill chunk of each size, at the middle of a --long_tokens prompt, in process."""
    g = Llama.build(str(ckpt), max_seq_len=a.long_tokens + 256, max_batch_size=1, dtype="float32", device="cpu")
    sizes = sorted(set(a.chunk_sizes + ([a.prefill_chunk] if a.prefill_chunk else [512])))
    model, times = g.model, {}
    model.reserve_cache(1, a.long_tokens + 256)
    tokens = torch.randint(3, g.tokenizer.n_words - 1, (1, a.long_tokens))
    print("| chunk (tokens) | one chunk at mid-prompt (s) | prefill tokens/s |")
    print("|---|---|---|")
    with torch.inference_mode():
        model.hidden(tokens[:, :64], 0)  # warm up
        for n in sizes:
            mid = max(0, a.long_tokens // 2 - n)
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                model.hidden(tokens[:, mid : mid + n], mid)
                best = min(best, time.perf_counter() - t)
            times[n] = best
            print(f"| {n} | {best:.3f} | {n / best:.0f} |", flush=True)
    del g, model
    return times


if __name__ == "__main__":
    main()
