"""Serving jobs on every model-parallel rank, with continuous batching.

Rank 0 owns the queue of jobs (filled by the HTTP server) and decides; every other rank follows.
Before every decode step rank 0 broadcasts which rows leave (answers complete by a stop string,
clients that went away), which waiting jobs join (up to max_batch_size rows) and which long
prompt starts a chunked prefill; all ranks apply that to the same engine batch and take the step
in lockstep. After the step rank 0 turns each job's new tokens into text and hands it to the
HTTP side.

Chunked prefill: while rows are decoding, a round prefills about one chunk (`prefill_chunk`) of
prompt tokens: jobs whose prompt (less what the prefix cache holds) fits
join at once; a longer one is prefilled one chunk per round beside the batch (StagedPrefill) and
joins with its last chunk, so running streams wait about one chunk per step. With no row
decoding, waiting jobs join at once, whatever their length.
"""

import asyncio
import collections
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from llama.answers import Answer, Result
from llama.batch import RowUpdate
from llama.chunked_prefill import StagedPrefill
from llama.engine import Engine
from llama.protocol import Job
from llama.tokenizer import TokenizerProtocol

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
class Running:
    """Rank 0's view of a job in the batch: where its events go, and its answer so far."""

    handle: Handle
    answer: Answer


@dataclass
class Stats:
    requests: int = 0
    steps_by_rows: Dict[int, int] = field(default_factory=dict)  # decode steps run with that many rows
    cancelled: int = 0
    prefill_chunks: int = 0  # chunks of long prompts prefilled beside the batch (StagedPrefill.step)

    @property
    def largest_batch(self) -> int:
        return max(self.steps_by_rows, default=0)


class Scheduler:
    """Continuous batching: a request joins the running batch at the next step (if there is a free
    row) and leaves it when its answer is complete."""

    def __init__(self, engine: Engine, tokenizer: TokenizerProtocol, max_queue: int = 64,
                 prefill_chunk: Optional[int] = None):
        """prefill_chunk: prompt tokens prefilled per round while rows decode (default: the
        engine's prefill_chunk_size)."""
        self.engine, self.tokenizer = engine, tokenizer
        self.prefill_chunk = prefill_chunk or engine.prefill_chunk_size
        self.max_batch_size = engine.max_batch_size
        self.queue: "queue.Queue[Handle]" = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.stats = Stats()
        self.running = 0
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # Control messages go over gloo (CPU), whatever the model's backend.
        self.group = dist.new_group(backend="gloo") if self.world > 1 else None
        stop = {self.tokenizer.eos_id, self.tokenizer.eot_id, self.tokenizer.step_id}
        self.stop_ids = sorted(t for t in stop if t is not None)
        self.texts: Dict[int, Running] = {}  # rank 0: the running jobs, by row key
        self.leaving: Set[int] = set()  # rank 0: rows whose answer is over but that still run
        self.next_key = 0
        self.metrics = None  # rank 0: the server's llama.metrics.Metrics, for gauges such as the prefix cache's
        self.waiting: "collections.deque[Handle]" = collections.deque()  # rank 0: taken, not yet joined
        self.staged: Optional[Tuple[int, Job, StagedPrefill]] = None  # every rank: the chunked prefill

    # The HTTP side (rank 0) ---------------------------------------------------------------------

    def submit(self, job: Job, loop: Optional[asyncio.AbstractEventLoop] = None) -> Handle:
        handle = Handle(job, loop, asyncio.Queue())
        if job.fixed_answer is not None:  # nothing for the model to do
            handle.send(("text", job.echo_text + job.fixed_answer))
            handle.send(("done", Result(job.fixed_answer, "stop", len(job.prompt_tokens), 0)))
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

    @torch.inference_mode()
    def loop(self) -> None:
        """Serve until rank 0 says stop (every rank runs this). Each round: rank 0 decides which rows
        leave and which jobs join, every rank applies that, and the batch takes one decode step."""
        batch = self.engine.open_batch(self.stop_ids, logprobs=True)
        while True:
            message = self._plan(batch) if self.rank == 0 else None
            message = self._broadcast(message)
            if message == STOP:
                return
            leave, join, stage = message
            try:
                batch.drop(set(leave))
                self._prefill(batch, leave, join, stage)
                self.running = len(batch)
                if batch:
                    self.stats.steps_by_rows[len(batch)] = self.stats.steps_by_rows.get(len(batch), 0) + 1
                    updates = batch.step(sync=True)
                    if self.rank == 0:
                        for u in updates:
                            self._on_update(u)
            except Exception as e:  # a failure on every rank (out of memory, say): its clients get an error
                print(f"llama.server: {type(e).__name__}: {e}", file=sys.stderr)
                batch.drop(set(batch.keys))
                self.staged = None
                if self.engine.prefix_cache is not None:  # what the failed step wrote is not trusted
                    self.engine.prefix_cache.clear()
                if self.rank == 0:
                    for key in list(self.texts):
                        self._end(key, ("error", f"{type(e).__name__}: {e}"))

    def _plan(self, batch):
        """Rank 0: (rows to drop, jobs to add as (key, job), a job whose chunked prefill starts or
        None), or STOP."""
        if self.stopping.is_set():
            for key in list(self.texts):
                self._end(key, ("error", "the server is shutting down"))
            while self.waiting:
                self.waiting.popleft().send(("error", "the server is shutting down"))
            return STOP
        for key, t in self.texts.items():
            if t.handle.cancelled and key not in self.leaving:
                self.stats.cancelled += 1
                print(f"llama.server: request {t.handle.job.id} cancelled: the client went away", file=sys.stderr)
                self.leaving.add(key)
        staged = {self.staged[0]} if self.staged else set()
        leave = sorted(self.leaving & (set(batch.keys) | staged))
        for key in self.leaving:
            self.texts.pop(key, None)
        self.leaving = set()
        staying = len(batch) - len(set(leave) - staged)
        free = self.max_batch_size - staying - (1 if staged - set(leave) else 0)
        join, stage = [], None
        chunk = self.prefill_chunk
        budget = None  # prompt tokens this round may prefill (None: no row is decoding, no limit)
        if staying or (staged - set(leave)):
            budget = chunk - (min(self.staged[2].remaining, chunk) if staged - set(leave) else 0)
        wait = 0.0 if batch or self.staged else 1.0  # idle: block for a while (then a heartbeat round)
        while len(join) + (stage is not None) < free:
            try:
                if self.waiting:
                    handle = self.waiting.popleft()
                else:
                    handle = self.queue.get(timeout=wait) if wait else self.queue.get_nowait()
            except queue.Empty:
                break
            wait = 0.005 if not batch and not join else 0.0  # requests sent together arrive together
            if handle.cancelled:
                continue
            todo = self._to_prefill(handle.job.prompt_tokens)
            if budget is not None and todo > budget:
                if todo <= chunk or join or self.staged or stage:  # its turn comes in a later round
                    self.waiting.appendleft(handle)
                    break
            key, self.next_key = self.next_key, self.next_key + 1
            self.texts[key] = Running(handle, self._answer(handle.job))
            if handle.job.echo_text:
                handle.send(("text", handle.job.echo_text))
            if budget is not None and todo > budget:
                stage = (key, handle.job)
                break
            join.append((key, handle.job))
            budget = None if budget is None else budget - todo
        return leave, join, stage

    def _to_prefill(self, prompt: List[int]) -> int:
        """Rank 0: the prompt tokens a join would run now (what the prefix cache lacks)."""
        cache = self.engine.prefix_cache
        return len(prompt) - (cache.peek(prompt) if cache is not None else 0)

    def _prefill(self, batch, leave, join, stage) -> None:
        """Every rank: the round's prefill work. The chunked prefill under way takes its next
        chunk, or joins with its last one; the jobs in `join` join; `stage` starts its chunked
        prefill (its first chunk now)."""
        prefixes: List[Optional[StagedPrefill]] = [None] * len(join)
        if self.staged is not None and self.staged[0] in leave:
            self.staged = None
        if self.staged is not None:
            key, job, staged = self.staged
            if staged.remaining <= self.prefill_chunk:
                join, prefixes = [(key, job)] + list(join), [staged] + prefixes
                self.staged = None
            else:
                staged.step()
                self.stats.prefill_chunks += 1
        if join:
            self._join(batch, join, prefixes)
        if stage is not None:
            key, job = stage
            staged = self.engine.start_prefill(job.prompt_tokens, self.prefill_chunk)
            if staged.remaining <= self.prefill_chunk:  # the prefix cache holds the rest
                self._join(batch, [stage], [staged])
            else:
                staged.step()
                self.stats.prefill_chunks += 1
                self.staged = (key, job, staged)

    def _answer(self, job: Job) -> Answer:
        decode = self.tokenizer.decode_infilling if job.infill else self.tokenizer.decode
        return Answer(decode, self.tokenizer.token_piece, job.stop, job.params.logprobs, len(job.prompt_tokens))

    def _join(self, batch, join, prefixes=None) -> None:
        updates = self.engine.admit(batch, [key for key, _ in join], [job.prompt_tokens for _, job in join],
                                    [job.params for _, job in join], prefixes)
        if self.rank == 0:
            for u in updates:
                if u.finish_reason:  # nothing to generate (max_tokens 0)
                    self._on_update(u)

    def _broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _end(self, key: int, event) -> None:
        t = self.texts.pop(key, None)
        if t is not None:
            t.handle.send(event)

    def _on_update(self, u: RowUpdate) -> None:
        """Rank 0: new tokens of one job. Hands out the text that can no longer change; once the
        answer is complete, sends the result and, if the row still runs, marks it to leave."""
        running = self.texts.get(u.row)
        if running is None or u.row in self.leaving:
            return
        text, result = running.answer.add(u)
        if text:
            running.handle.send(("text", text))
        if result is None:
            return
        self._end(u.row, ("done", result))
        if u.finish_reason is None:
            self.leaving.add(u.row)
