"""The generation loop: prefill prompts, then decode one token per unfinished row per step.

- Prefill: prompts are sorted by length and grouped so that padding a group to its longest prompt
  wastes little; each group goes through the model in one pass (in chunks for long prompts) and
  only the logits that are needed are computed.
- Decode: rows advance at their own positions; the host looks at the new tokens only every
  `sync_every` steps (to stop rows, and to hand tokens to a stream), and rows that have finished
  are dropped from the batch then. New rows can join a running `Batch` between steps.

Every model-parallel rank runs this loop on the same inputs and draws the same tokens, so all
ranks take the same decisions without talking to each other.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from llama.model import KVCache, Transformer
from llama.sampling import sample, sample_rows


@dataclass
class RowUpdate:
    """New output of one prompt of the batch."""

    row: int  # which row: the prompt's index in generate(), the caller's key in a Batch
    tokens: List[int]  # tokens made since its last update (a stop token is not included)
    logprobs: List[float]  # their log-probabilities (empty unless asked for)
    finish_reason: Optional[str] = None  # "stop" (a stop token) or "length" (its budget) once done
    prompt_logprobs: Optional[List[float]] = None  # in the first update, when asked for


def prefill_groups(lengths: Sequence[int], waste: float = 0.25) -> List[range]:
    """Split rows, sorted by ascending length, into runs whose padding to their longest prompt is
    at most `waste` of their real tokens (a single row always forms a run)."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and n * (i + 1 - start) > (1 + waste) * (total + n):
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


def _token_logprobs(model: Transformer, h: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> List[float]:
    """log p(targets[t] | ...) from hidden states h (T, dim), `chunk` positions of logits at a time."""
    out = []
    for s in range(0, h.shape[0], chunk):
        lp = F.log_softmax(model.logits(h[s : s + chunk]), dim=-1)
        out.append(lp.gather(1, targets[s : s + chunk, None])[:, 0])
    return torch.cat(out).tolist() if out else []


def _prefill(
    model: Transformer, prompts: List[List[int]], need_logits: List[bool], prompt_logprobs: bool, chunk: int,
    row0: int = 0,
):
    """Run the prompts, sorted by length, through the model, writing cache rows row0..row0+n-1.

    Returns (the indices k with need_logits[k], the logits (len, V) of their last prompt token,
    per-prompt log-probabilities of tokens 1.. when asked)."""
    device = model.output.weight.device
    lengths = [len(p) for p in prompts]
    last_h: List[Optional[torch.Tensor]] = [None] * len(prompts)
    lps: List[List[float]] = [[] for _ in prompts]
    for group in prefill_groups(lengths):
        if not prompt_logprobs and not any(need_logits[k] for k in group):
            continue
        width = max(lengths[k] for k in group)
        tokens = torch.zeros((len(group), width), dtype=torch.long, device=device)  # right-padded
        for j, k in enumerate(group):
            tokens[j, : lengths[k]] = torch.tensor(prompts[k], dtype=torch.long, device=device)
        # Padding only ever follows a row's prompt, so causal attention keeps it out of the prompt.
        for s in range(0, width, chunk):
            h = model.hidden(tokens[:, s : s + chunk], s, rows=slice(row0 + group.start, row0 + group.stop))
            for j, k in enumerate(group):
                if s <= lengths[k] - 1 < s + chunk:
                    last_h[k] = h[j, lengths[k] - 1 - s]
                if prompt_logprobs:
                    n = min(h.shape[1], lengths[k] - 1 - s)  # positions whose next token is in the prompt
                    if n > 0:
                        lps[k] += _token_logprobs(model, h[j, :n], tokens[j, s + 1 : s + 1 + n])
    wanted = [k for k in range(len(prompts)) if need_logits[k]]
    logits = model.logits(torch.stack([last_h[k] for k in wanted])) if wanted else None
    return wanted, logits, lps


def eager_decode(model: Transformer, token: torch.Tensor, pos: torch.Tensor, pos_host: List[int]) -> torch.Tensor:
    """Logits (A, V) after feeding one token per active row (cache rows 0..A-1) at its position."""
    uniform = min(pos_host) == max(pos_host)
    start = pos_host[0] if uniform else pos  # a shared position needs no mask
    h = model.hidden(token[:, None], start, kv_len=max(pos_host) + 1, rows=slice(0, len(pos_host)))
    return model.logits(h[:, -1])


class CompiledDecode:
    """The decode step compiled with torch.compile for static shapes (CUDA graphs on a GPU).

    Each batch runs on a KV cache of its own size bucket (rows padded to a power of two, length
    rounded to a power of two), kept across calls at fixed addresses; the step attends over the
    whole cache with a mask and writes it in place. So each (rows, length) pair compiles once.
    If compilation fails, a warning says why and the eager step is used from then on."""

    def __init__(self, model: Transformer):
        self.model = model
        cuda = model.output.weight.device.type == "cuda"
        self.compiled = torch.compile(self._step, mode="reduce-overhead" if cuda else None, dynamic=False)
        self.caches: Dict[int, KVCache] = {}
        self.broken: Optional[str] = None

    def use_cache(self, batch_size: int, seq_len: int) -> None:
        """Point the model at the static cache of this batch's bucket, with room for seq_len."""
        rows = 1 << (batch_size - 1).bit_length()
        if rows not in self.caches:
            w = self.model.output.weight
            n_kv = self.model.layers[0].attention.n_local_kv_heads
            self.caches[rows] = KVCache(self.model.params, n_kv, w.dtype, w.device, pow2=True)
        cache = self.caches[rows]
        before = cache.k[0]
        cache.reserve(rows, seq_len)
        if cache.k[0] is not before:  # new tensors: tell the compiler their addresses are fixed
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        self.model.cache = cache

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        model = self.model
        h = model.hidden(token[:, None], pos, kv_len=model.cache.seq_len)  # every row of the cache
        return model.logits(h[:, -1])

    def __call__(self, model: Transformer, token: torch.Tensor, pos: torch.Tensor, pos_host: List[int]) -> torch.Tensor:
        if self.broken:
            return eager_decode(model, token, pos, pos_host)
        n, rows = len(pos_host), model.cache.batch_size
        if rows > n:  # rows that are padding or finished write at position 0 of unused cache rows
            token = torch.cat([token, token.new_zeros(rows - n)])
            pos = torch.cat([pos, pos.new_zeros(rows - n)])
        try:
            return self.compiled(token, pos)[:n].clone()  # a CUDA graph's next replay overwrites its output
        except Exception as e:  # compilation is best effort: any failure falls back to eager
            self.broken = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"compile=True: the decode step could not be compiled ({self.broken}); running eagerly")
            return eager_decode(model, token[:n], pos[:n], pos_host)


class Batch:
    """Rows being generated, one KV-cache row each (rows 0..len-1, in order). Rows join between
    steps (their prompts are prefilled then) and leave when they finish or are dropped.

    A step samples every row's next token; on a sync step the host reads the tokens made since the
    last sync, ends rows at a stop token or at their budget, and drops them; then the remaining
    rows' tokens go through the model. Rows that finish between syncs keep running until the next
    one (their extra tokens are discarded)."""

    def __init__(self, model: Transformer, stop_ids: Sequence[int], rng: Optional[torch.Generator],
                 logprobs: bool = False, prefill_chunk: int = 2048, decode: Callable = eager_decode):
        self.model, self.stop, self.rng, self.logprobs = model, set(stop_ids), rng, logprobs
        self.prefill_chunk, self.decode = prefill_chunk, decode
        self.device = model.output.weight.device
        # Per active row, in cache-row order:
        self.keys: List[int] = []  # the caller's id of the row
        self.left: List[int] = []  # tokens it may still make
        self.pos_host: List[int] = []  # where its next token goes
        self.cap: List[int] = []  # the last position it may use
        self.temps: List[float] = []
        self.top_ps: List[float] = []
        self.logits = self.pos = self.row_cap = self.row_temp = self.row_top_p = None  # device, one row per row
        self.pending: List[torch.Tensor] = []  # tokens sampled since the last sync, (A,) each
        self.pending_lp: List[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: List[int], prompts: List[List[int]], budgets: List[int], temperature: List[float],
            top_p: List[float], prompt_logprobs: bool = False) -> List[RowUpdate]:
        """Prefill new rows (after a sync: no tokens may be pending). The cache must have room for
        len(self) + len(prompts) rows of each row's prompt + budget positions. Returns an update for
        each new row: its prompt log-probabilities when asked, and "length" for a zero budget."""
        assert not self.pending, "rows join only right after a sync"
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        need = [budgets[i] > 0 for i in order]
        row0 = len(self.keys)
        wanted, logits, lps = _prefill(self.model, [prompts[i] for i in order], need, prompt_logprobs,
                                       self.prefill_chunk, row0)
        updates = [RowUpdate(keys[order[k]], [], [], None if need[k] else "length", lps[k] if prompt_logprobs else None)
                   for k in range(len(order))]
        if not wanted:
            return updates
        self.model.cache.keep_rows(list(range(row0)) + [row0 + k for k in wanted])
        rows = [order[k] for k in wanted]
        self.keys += [keys[i] for i in rows]
        self.left += [budgets[i] for i in rows]
        self.pos_host += [len(prompts[i]) for i in rows]
        self.cap += [len(prompts[i]) + budgets[i] - 1 for i in rows]
        self.temps += [temperature[i] for i in rows]
        self.top_ps += [top_p[i] for i in rows]

        def grown(old, new):
            return new if old is None else torch.cat([old, new])

        self.logits = grown(self.logits, logits)
        self.pos = grown(self.pos, torch.tensor([len(prompts[i]) for i in rows], device=self.device))
        self.row_cap = grown(self.row_cap, torch.tensor([self.cap[-len(rows):]], device=self.device)[0])
        self.row_temp = grown(self.row_temp, torch.tensor([temperature[i] for i in rows], device=self.device))
        self.row_top_p = grown(self.row_top_p, torch.tensor([top_p[i] for i in rows], device=self.device))
        return updates

    def drop(self, keys) -> None:
        """Remove rows (by key) right after a sync; the others move up in the cache."""
        keep = [a for a, k in enumerate(self.keys) if k not in keys]
        if len(keep) == len(self.keys):
            return
        if keep:
            self.model.cache.keep_rows(keep)
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        self.logits, self.pos, self.row_cap = self.logits[index], self.pos[index], self.row_cap[index]
        self.row_temp, self.row_top_p = self.row_temp[index], self.row_top_p[index]
        for name in ("keys", "left", "pos_host", "cap", "temps", "top_ps"):
            values = getattr(self, name)
            setattr(self, name, [values[a] for a in keep])

    def step(self, sync: bool) -> List[RowUpdate]:
        """Sample every row's next token; on a sync, the updates of every row (finished rows are
        dropped); then feed the tokens of the rows still running."""
        if len({(t, p) for t, p in zip(self.temps, self.top_ps)}) == 1:
            token = sample(self.logits, self.temps[0], self.top_ps[0], self.rng)
        else:
            token = sample_rows(self.logits, self.row_temp, self.row_top_p, self.rng)
        self.pending.append(token)
        if self.logprobs:
            self.pending_lp.append(torch.log_softmax(self.logits, dim=-1).gather(1, token[:, None])[:, 0])
        updates = []
        if sync or len(self.pending) >= max(self.left):
            updates, kept = self._sync()
            token = token[kept]
        if self.keys:
            self.logits = self.decode(self.model, token, self.pos, self.pos_host)
            # A row past its end (not yet seen by a sync) keeps rewriting its last position.
            self.pos_host = [min(p + 1, c) for p, c in zip(self.pos_host, self.cap)]
            self.pos = torch.minimum(self.pos + 1, self.row_cap)
        return updates

    def _sync(self):
        """(an update per row, the positions of the rows still running); drops the finished rows."""
        new = torch.stack(self.pending, 1).tolist()
        new_lp = torch.stack(self.pending_lp, 1).tolist() if self.logprobs else [[] for _ in self.keys]
        self.pending, self.pending_lp = [], []
        updates, done = [], set()
        for a, key in enumerate(self.keys):
            u = RowUpdate(key, [], [])
            for t, lp in zip(new[a], new_lp[a] or [None] * len(new[a])):
                if t in self.stop:
                    u.finish_reason = "stop"
                    break
                u.tokens.append(t)
                if self.logprobs:
                    u.logprobs.append(lp)
                self.left[a] -= 1
                if self.left[a] == 0:
                    u.finish_reason = "length"
                    break
            updates.append(u)
            if u.finish_reason:
                done.add(key)
        kept = torch.tensor([a for a, k in enumerate(self.keys) if k not in done], device=self.device, dtype=torch.long)
        self.drop(done)
        return updates, kept


def generate(
    model: Transformer,
    prompts: List[List[int]],
    budgets: List[int],
    stop_ids: Sequence[int],
    temperature: Union[float, Sequence[float]],
    top_p: Union[float, Sequence[float]],
    rng: Optional[torch.Generator],
    logprobs: bool = False,
    prompt_logprobs: bool = False,
    sync_every: int = 1,
    prefill_chunk: int = 2048,
    decode: Callable = eager_decode,
) -> Iterator[List[RowUpdate]]:
    """Continue each prompt by up to budgets[i] tokens, stopping a row at any of `stop_ids`.

    temperature, top_p: one value for all rows, or one per prompt.

    Yields lists of RowUpdate, every `sync_every` decode steps, until every row has finished
    (a caller may stop iterating earlier). The cache must already have room for
    len(prompts) rows of max(len(prompt) + budget) positions."""
    n = len(prompts)
    temps = list(temperature) if isinstance(temperature, Sequence) else [temperature] * n
    top_ps = list(top_p) if isinstance(top_p, Sequence) else [top_p] * n
    batch = Batch(model, stop_ids, rng, logprobs, prefill_chunk, decode)
    first = {u.row: u for u in batch.add(list(range(n)), prompts, budgets, temps, top_ps, prompt_logprobs)}
    steps = 0
    while batch:
        steps += 1
        updates = batch.step(sync=steps % sync_every == 0)
        if not updates:
            continue
        for u in updates:  # the first update of each row carries what add() said about it
            if u.row in first:
                f = first.pop(u.row)
                u.prompt_logprobs = f.prompt_logprobs
        yield updates + list(first.values())
        first = {}
    if first:
        yield list(first.values())
