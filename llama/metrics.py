"""The server's Prometheus metrics (GET /metrics, in the Prometheus text format, by prometheus-client).

Each server has its own registry (no process-wide state). Metric names start with `llama_`:

- llama_requests_total{endpoint, status}: answered HTTP requests (unknown paths as endpoint "other")
- llama_requests_running, llama_requests_waiting: rows in the batch, jobs in the queue (read at scrape)
- llama_prompt_tokens_total, llama_generation_tokens_total: tokens of finished answers
- llama_time_to_first_token_seconds: from a request's arrival to its first answer text
- llama_time_per_output_token_seconds: a finished answer's time after its first text, per later token
- llama_prefix_cache_hit_ratio: share of prompt tokens looked up that the prefix cache served (server.main wires it)
- llama_kv_blocks_in_use: prefix-cache blocks holding tokens (server.main wires it)
- llama_speculative_acceptance_rate, llama_speculative_tokens_per_forward: with --speculative (server.main wires them)
"""

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The metrics of one server. `prefix_cache_hit_ratio` and `kv_blocks_in_use` are gauges for
    the scheduler to `.set()` (it holds this object as `Scheduler.metrics` on rank 0, None on the
    other ranks and outside the server); they stay 0 while there is no prefix cache."""

    def __init__(self, endpoints: Iterable[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.endpoints = set(endpoints)
        r = self.registry
        self.requests = Counter("llama_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.running = Gauge("llama_requests_running", "Rows in the running batch", registry=r)
        self.waiting = Gauge("llama_requests_waiting", "Jobs waiting for a row", registry=r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of finished answers", registry=r)
        self.generation_tokens = Counter("llama_generation_tokens", "Tokens generated in finished answers",
                                         registry=r)
        self.time_to_first_token = Histogram("llama_time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first answer text",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("llama_time_per_output_token_seconds",
                                               "Seconds per token of an answer after its first text",
                                               buckets=TPOT_BUCKETS, registry=r)
        self.prefix_cache_hit_ratio = Gauge("llama_prefix_cache_hit_ratio",
                                            "Share of prompt tokens served from the prefix cache", registry=r)
        self.kv_blocks_in_use = Gauge("llama_kv_blocks_in_use", "KV-cache blocks holding tokens", registry=r)
        self.speculative_acceptance_rate = Gauge(
            "llama_speculative_acceptance_rate", "Share of proposed tokens the target accepted (speculative decoding)",
            registry=r)
        self.speculative_tokens_per_forward = Gauge(
            "llama_speculative_tokens_per_forward", "Tokens made per row per target forward (speculative decoding)",
            registry=r)

    def watch(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the running and waiting counts from these functions at every scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def request(self, path: str, status: int) -> None:
        """Count one answered request (paths other than the served endpoints count as "other")."""
        self.requests.labels(path if path in self.endpoints else "other", str(status)).inc()

    def answer(self, prompt_tokens: int, completion_tokens: int, first_s: float, total_s: float) -> None:
        """Record a finished answer: its tokens, its time to first text and after it (seconds from arrival)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.time_to_first_token.observe(first_s)
        self.generation_tokens.inc(completion_tokens)
        if completion_tokens > 1:
            self.time_per_output_token.observe(max(0.0, total_s - first_s) / (completion_tokens - 1))

    def text(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
