"""Serving throughput and latency: python -m llama.server under 1, 4 and 8 concurrent clients.

    python benchmarks/server.py [--shape cpu] [--requests 24] [--max_tokens 32]

Writes a random checkpoint of the chosen shape (the 168M-parameter CPU shape by default), starts
the server on 127.0.0.1 with max_batch_size 8, and for each number of clients sends --requests
completion requests (greedy, prompts of 20 to 100 tokens), each client one request at a time.
Reports requests/s, generated tokens/s and the p50/p95 latency of a request.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate import SHAPES  # noqa: E402
from llama.tiny import write_tiny_model  # noqa: E402

WORDS = "def class return import for while if else self value items list dict print sum range len".split()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="cpu")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8391)
    a = parser.parse_args()
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_model(Path(tmp) / "model", **SHAPES[a.shape])
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


if __name__ == "__main__":
    main()
