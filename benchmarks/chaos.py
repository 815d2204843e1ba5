"""Chaos against a real server: concurrent clients mixing good requests, hostile ones and hang-ups.

    python benchmarks/chaos.py [--seconds 300] [--clients 8] [--seed 0]

Writes a tiny random model, starts `python -m llama.server` on 127.0.0.1 and, for --seconds,
has --clients threads send a seeded mix of: good completions, chats and infills (greedy,
streamed or not); bad inputs (lone surrogates, JSON nested 1,000 deep, wrong types, wrong
content type, oversized bodies, too many stop strings, bad keys and hosts); random mutations of
good bodies; and clients that hang up, streamed or not, at random points. Then it checks that
every good answer equals the answer the same request got alone, that no response was a 500 or a
dropped connection, that no row is left running, the server's memory before and after, and that
SIGTERM ends it within its grace period. tests/test_chaos.py runs a short version of this (20 s or 2,000 requests).
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox", "x", "for i in range(10):",
           "SELECT name FROM users", "class Stack:", "Hello world"]
DIALOG = [{"role": "user", "content": "What is a list?"}]


def good_requests() -> List[Tuple[str, dict]]:
    """(path, body) of the well-formed greedy requests, each with a known answer."""
    out = []
    for i, p in enumerate(PROMPTS):
        out.append(("/v1/completions", {"prompt": p, "max_tokens": 4 + i % 5, "temperature": 0, "stream": i % 2 == 0}))
    out.append(("/v1/completions", {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c\n", "max_tokens": 6,
                                    "temperature": 0}))
    out.append(("/v1/chat/completions", {"messages": DIALOG, "max_tokens": 6, "temperature": 0}))
    out.append(("/v1/chat/completions", {"messages": DIALOG, "max_tokens": 6, "temperature": 0, "stream": True}))
    out.append(("/infill", {"input_prefix": "def f(x):\n    ", "input_suffix": "\n    return y", "n_predict": 6,
                            "temperature": 0}))
    return out


def bad_requests() -> List[Tuple[str, object, Dict[str, str]]]:
    """(path, raw body or JSON object, extra headers) that a server must refuse with a 4xx."""
    deep = '{"prompt": "x", "a": ' + "[" * 1000 + "]" * 1000 + "}"
    return [
        ("/v1/completions", '{"prompt": "a\\ud800b"}', {}),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', {}),
        ("/infill", '{"input_prefix": "\\ud800", "n_predict": 2}', {}),
        ("/v1/completions", deep, {}),
        ("/v1/completions", "{not json", {}),
        ("/v1/completions", {"prompt": 5}, {}),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, {}),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, {}),
        ("/v1/completions", {"prompt": "x", "stop": ["s%d" % i for i in range(5000)]}, {}),
        ("/v1/completions", {"prompt": "x", "stop": ["y" * 300]}, {}),
        ("/v1/completions", {"prompt": "x " * 5000}, {}),
        ("/v1/completions", {"prompt": "x"}, {"Content-Type": "text/plain"}),
        ("/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer wrong"}),
        ("/v1/completions", {"prompt": "x"}, {"Host": "evil.example"}),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, {}),
        ("/v1/completions", json.dumps({"prompt": "x" * (3 << 20)}), {}),  # past the body limit
    ]


JUNK_VALUES = [None, -1, 0, 1e308, "x", [], {}, True, 10**20, "\ud800", [[["x"]]], -0.5, "\x00"]


def mutate(rng: random.Random, body: dict) -> str:
    """A good body changed at random: a field given a junk value, or the JSON text damaged."""
    if rng.random() < 0.5:
        body = dict(body)
        key = rng.choice(list(body) + ["n", "logprobs", "echo", "stop", "top_p", "suffix"])
        body[key] = rng.choice(JUNK_VALUES)
        return json.dumps(body)
    raw = list(json.dumps(body))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(raw) + 1)
        op = rng.random()
        if op < 0.4 and raw:
            del raw[min(i, len(raw) - 1)]
        else:
            raw.insert(i, rng.choice(['"', "\\", "{", "]", ",", ":", "\\ud800", "9" * 30, "\x00", "é"]))
    return "".join(raw)


@dataclass
class Report:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    wrong_answers: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)  # 500s and dropped connections

    def as_dict(self) -> dict:
        return {"requests": self.requests, "statuses": dict(self.statuses), "kinds": dict(self.kinds),
                "wrong_answers": len(self.wrong_answers), "failures": self.failures[:10]}


def answer_text(path: str, body: dict, r: httpx.Response) -> str:
    """The generated text of a 200 answer, streamed or not."""
    if not body.get("stream"):
        data = r.json()
        if path == "/infill":
            return data["content"]
        choice = data["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    text = ""
    for line in r.text.splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if path == "/infill":
            text += chunk["content"]
        else:
            choice = chunk["choices"][0]
            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


class Chaos:
    """Clients for a server at `url` (API key `key`)."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def send(self, client: httpx.Client, path: str, body, extra: Optional[Dict[str, str]] = None, timeout=60):
        raw = body if isinstance(body, str) else json.dumps(body)
        return client.post(f"{self.url}{path}", content=raw.encode("utf-8", "surrogatepass"),
                           headers={**self.headers, **(extra or {})}, timeout=timeout)

    def expected(self) -> Dict[int, str]:
        """Each good request's answer when it is sent alone."""
        with httpx.Client() as c:
            out = {}
            for i, (path, body) in enumerate(good_requests()):
                r = self.send(c, path, body)
                assert r.status_code == 200, r.text
                out[i] = answer_text(path, body, r)
            return out

    def run(self, seconds: float, clients: int, seed: int, max_requests: int) -> Report:
        expected = self.expected()
        goods, bads = good_requests(), bad_requests()
        report, lock = Report(), threading.Lock()
        end = time.time() + seconds

        def note(kind: str, status: Optional[int], problem: Optional[str] = None, wrong: Optional[str] = None):
            with lock:
                report.requests += 1
                report.kinds[kind] += 1
                report.statuses[status if status is not None else "hung up"] += 1
                if problem:
                    report.failures.append(problem)
                if wrong:
                    report.wrong_answers.append(wrong)

        def one(rng: random.Random, c: httpx.Client) -> None:
            roll = rng.random()
            i = rng.randrange(len(goods))
            path, body = goods[i]
            try:
                if roll < 0.45:
                    r = self.send(c, path, body)
                    text = answer_text(path, body, r) if r.status_code == 200 else None
                    wrong = None if text == expected[i] else f"{path} {body}: {text!r} != {expected[i]!r}"
                    note("good", r.status_code, None if r.status_code == 200 else f"good request got {r.status_code}",
                         wrong if r.status_code == 200 else None)
                elif roll < 0.65:
                    bad_path, bad_body, extra = rng.choice(bads)
                    r = self.send(c, bad_path, bad_body, extra)
                    note("bad", r.status_code, f"bad input got {r.status_code}" if not 400 <= r.status_code < 500 else None)
                elif roll < 0.85:
                    r = self.send(c, path, mutate(rng, body))
                    note("mutated", r.status_code, f"mutated body got {r.status_code}" if r.status_code >= 500 else None)
                else:
                    self.hang_up(rng, c, path, body)
                    note("hang-up", None)
            except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError) as e:
                note("dropped", None, f"dropped connection: {type(e).__name__}: {e}")

        def worker(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            with httpx.Client() as c:
                while time.time() < end:
                    with lock:
                        if report.requests >= max_requests:
                            return
                    one(rng, c)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return report

    def hang_up(self, rng: random.Random, c: httpx.Client, path: str, body: dict) -> None:
        """Ask for a long answer and go away: streamed after a few events, or on a short timeout."""
        body = {**body, "stop": ["\x00"]}
        body["n_predict" if path == "/infill" else "max_tokens"] = 200
        if rng.random() < 0.5:
            raw = json.dumps({**body, "stream": True})
            with c.stream("POST", f"{self.url}{path}", content=raw, headers=self.headers, timeout=60) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= rng.randint(0, 6):
                        break
        else:
            try:
                self.send(c, path, {**body, "stream": False}, timeout=rng.uniform(0.01, 0.3))
            except httpx.TimeoutException:
                pass

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", headers=self.headers).json()

    def wait_idle(self, deadline: float = 15) -> dict:
        end = time.time() + deadline
        while True:
            s = self.stats()
            if (s["running"] == 0 and s["queued"] == 0) or time.time() > end:
                return s
            time.sleep(0.1)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_requests", type=int, default=100_000)
    a = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from llama.tiny import write_tiny_model

    key = "chaos-key"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_model(Path(tmp) / "model")
        log = open(Path(tmp) / "server.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt), "--port", str(port),
                                 "--max_seq_len", "256", "--max_batch_size", "4"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "LLAMA_API_KEY": key, "OMP_NUM_THREADS": "1"})
        chaos = Chaos(f"http://127.0.0.1:{port}", key)
        while True:
            try:
                if httpx.get(f"{chaos.url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        chaos.expected()  # warm up
        before = rss_mb(proc.pid)
        start = time.time()
        report = chaos.run(a.seconds, a.clients, a.seed, a.max_requests)
        elapsed = time.time() - start
        idle = chaos.wait_idle()
        after = rss_mb(proc.pid)
        t = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        exit_s = time.time() - t
        log.seek(0)
        tracebacks = log.read().count("Traceback")
    result = {"seconds": round(elapsed, 1), **report.as_dict(), "cancelled": idle["cancelled"],
              "running_after": idle["running"], "rss_mb_before": round(before), "rss_mb_after": round(after),
              "sigterm_exit_s": round(exit_s, 2), "exit_code": code, "tracebacks_in_log": tracebacks}
    print(json.dumps(result, indent=1))
    ok = not report.failures and not report.wrong_answers and idle["running"] == 0 and code == 0 and not tracebacks
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
