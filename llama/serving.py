"""Serving jobs in batches on every model-parallel rank.

Rank 0 owns the queue of jobs (filled by the HTTP server) and decides; every other rank follows.
In each round rank 0 takes the jobs waiting (up to max_batch_size) and broadcasts them; all ranks
run the same batch through the engine in lockstep. After every decode step rank 0 turns the new
tokens into text for each job, checks stop strings and clients that went away, and broadcasts the
rows to cancel, so that all ranks drop the same rows at the same step.
"""

import asyncio
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch.distributed as dist

from llama.generation import Llama
from llama.protocol import Job, Result
from llama.tokenizer import StreamDecoder

STOP = "stop"  # broadcast by rank 0 to end the loop on every rank


class QueueFull(Exception):
    pass


@dataclass
class Handle:
    """The HTTP side's view of a submitted job: events arrive on an asyncio queue."""

    job: Job
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    cancelled: bool = False  # set by the HTTP side when the client went away

    def send(self, event) -> None:
        """From the model thread: a ("text", str) or ("done", Result) or ("error", str) event."""
        if self.loop is None:
            self.events.put_nowait(event)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Text:
    """Rank 0's state of a running job: its answer as text, and what has been handed out."""

    handle: Handle
    decoder: StreamDecoder
    text: str = ""
    sent: int = 0
    tokens: int = 0
    pieces: List[str] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    offsets: List[int] = field(default_factory=list)
    stop_word: str = ""


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: List[int] = field(default_factory=list)
    cancelled: int = 0


class Scheduler:
    def __init__(self, generator: Llama, max_queue: int = 64, gather_seconds: float = 0.01):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_batch_size = generator.model.params.max_batch_size
        self.queue: "queue.Queue[Handle]" = queue.Queue(maxsize=max_queue)
        self.gather_seconds = gather_seconds
        self.stopping = threading.Event()
        self.stats = Stats()
        self.running = 0
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # Control messages go over gloo (CPU), whatever the model's backend.
        self.group = dist.new_group(backend="gloo") if self.world > 1 else None
        stop = {self.tokenizer.eos_id, self.tokenizer.eot_id, self.tokenizer.step_id}
        self.stop_ids = sorted(t for t in stop if t is not None)

    # The HTTP side (rank 0) ---------------------------------------------------------------------

    def submit(self, job: Job, loop: Optional[asyncio.AbstractEventLoop] = None) -> Handle:
        handle = Handle(job, loop, asyncio.Queue())
        if job.fixed_answer is not None:  # nothing for the model to do
            text = job.fixed_answer
            handle.send(("text", job.echo_text + text))
            handle.send(("done", Result(text, "stop", len(job.prompt_tokens), 0)))
            return handle
        try:
            self.queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull() from None
        self.stats.requests += 1
        return handle

    def shutdown(self) -> None:
        self.stopping.set()

    # Every rank ----------------------------------------------------------------------------------

    def loop(self) -> None:
        """Serve rounds until rank 0 says stop (every rank runs this)."""
        while True:
            handles = message = None
            if self.rank == 0:
                handles = self._take()
                message = STOP if handles == STOP else [h.job for h in handles]
            jobs = self._broadcast(message)
            if jobs == STOP:
                return
            if jobs:
                self._run(jobs, handles)

    def _take(self):
        """Rank 0: the next batch of waiting jobs, [] when idle for a while, or STOP."""
        deadline = time.monotonic() + 1.0
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            gather_until = time.monotonic() + self.gather_seconds  # let requests sent together arrive
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, gather_until - time.monotonic())))
                except queue.Empty:
                    break
            return [h for h in batch if not h.cancelled] or []
        return STOP if self.stopping.is_set() else []

    def _broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _run(self, jobs: List[Job], handles: Optional[List[Handle]]) -> None:
        self.running = len(jobs)
        if self.rank == 0:
            self.stats.batches += 1
            self.stats.batch_sizes.append(len(jobs))
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            texts = []
            for h in handles:
                decode = self.tokenizer.decode_infilling if h.job.infill else self.tokenizer.decode
                texts.append(_Text(h, StreamDecoder(decode)))
                if h.job.echo_text:
                    h.send(("text", h.job.echo_text))
        cancel = set()  # rows every rank drops at the next step
        over = [False] * len(jobs)  # rank 0: jobs whose answer is complete (or whose client left)
        try:
            for updates in self.generator._run(
                [j.prompt_tokens for j in jobs], [j.max_tokens for j in jobs], [j.temperature for j in jobs],
                [j.top_p for j in jobs], any(j.logprobs for j in jobs), False, self.stop_ids, 1, cancel=cancel,
            ):
                new_cancels = []
                if self.rank == 0:
                    for u in updates:
                        if over[u.row]:
                            continue
                        h = texts[u.row].handle
                        if h.cancelled or self.stopping.is_set():
                            self.stats.cancelled += 1
                            h.send(("error", "the server is shutting down" if self.stopping.is_set() else "cancelled"))
                            over[u.row] = True
                        else:
                            over[u.row] = self._on_update(texts[u.row], u)
                        if over[u.row] and u.finish_reason is None:
                            new_cancels.append(u.row)
                cancel.update(self._broadcast(new_cancels))
        except Exception as e:  # a failure on every rank (out of memory, say): this batch's clients get an error
            print(f"llama.server: a batch failed: {type(e).__name__}: {e}", file=sys.stderr)
            if self.rank == 0:
                for t, done in zip(texts, over):
                    if not done:
                        t.handle.send(("error", f"{type(e).__name__}: {e}"))
        finally:
            self.running = 0

    def _on_update(self, t: _Text, u) -> bool:
        """Rank 0: new tokens of one job. Hands out the text that can no longer change and returns
        True once the answer is complete (its row may still be running: the caller cancels it)."""
        job = t.handle.job
        for token, lp in zip(u.tokens, u.logprobs or [None] * len(u.tokens)):
            t.offsets.append(len(t.text))
            t.text += t.decoder.push(token)
            t.tokens += 1
            if job.logprobs:
                t.pieces.append(self.tokenizer.token_piece(token))
                t.logprobs.append(lp)
        if u.finish_reason is not None:
            t.text += t.decoder.flush()
        cut = min((i for i in (t.text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            t.stop_word = next(s for s in job.stop if t.text.find(s) == cut)
            t.text = t.text[:cut]
        done = cut >= 0 or u.finish_reason is not None
        # Text that could still turn out to begin a stop string is held back.
        hold = 0 if done else max((len(s) - 1 for s in job.stop), default=0)
        ready = max(t.sent, len(t.text) - hold)
        if ready > t.sent:
            t.handle.send(("text", t.text[t.sent : ready]))
            t.sent = ready
        if done:
            kept = [i for i, o in enumerate(t.offsets) if o < len(t.text)] if job.logprobs else []
            stop_type = "word" if cut >= 0 else ("eos" if u.finish_reason == "stop" else "limit")
            t.handle.send(("done", Result(
                t.text, "length" if stop_type == "limit" else "stop", len(job.prompt_tokens), t.tokens,
                stop_type, t.stop_word, [t.pieces[i] for i in kept], [t.logprobs[i] for i in kept],
                [t.offsets[i] for i in kept],
            )))
        return done
