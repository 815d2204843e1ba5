"""The generation loop: prefill a batch of prompts, then decode one token per unfinished row per step.

- Prefill: prompts are sorted by length and grouped so that padding a group to its longest prompt
  wastes little; each group goes through the model in one pass (in chunks for long prompts) and
  only the logits that are needed are computed.
- Decode: rows advance at their own positions; the host looks at the new tokens only every
  `sync_every` steps (to stop rows, and to hand tokens to a stream), and rows that have finished
  are dropped from the batch then.

Every model-parallel rank runs this loop on the same inputs and draws the same tokens, so all
ranks take the same decisions without talking to each other.
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Union

import torch
import torch.nn.functional as F

from llama.model import KVCache, Transformer
from llama.sampling import sample, sample_rows


@dataclass
class RowUpdate:
    """New output of one prompt of the batch."""

    row: int  # index of the prompt in the batch
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
    model: Transformer, prompts: List[List[int]], need_logits: List[bool], prompt_logprobs: bool, chunk: int
):
    """Run the sorted prompts through the model, writing cache rows 0..n-1.

    Returns (logits (n, V) of each prompt's last token, or None where not needed;
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
            h = model.hidden(tokens[:, s : s + chunk], s, rows=slice(group.start, group.stop))
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
    cancel: Optional[Set[int]] = None,
) -> Iterator[List[RowUpdate]]:
    """Continue each prompt by up to budgets[i] tokens, stopping a row at any of `stop_ids`.

    temperature, top_p: one value for all rows, or one per prompt.
    cancel: prompt indices the caller adds to between updates; those rows finish at the next one
        with finish_reason "cancelled" (a client that went away, a stop string that was seen).

    Yields lists of RowUpdate, every `sync_every` decode steps, until every row has finished
    (a caller may stop iterating earlier). The cache must already have room for
    len(prompts) rows of max(len(prompt) + budget) positions."""
    device = model.output.weight.device
    stop = set(stop_ids)
    cancel = set() if cancel is None else cancel
    temps = list(temperature) if isinstance(temperature, Sequence) else [temperature] * len(prompts)
    top_ps = list(top_p) if isinstance(top_p, Sequence) else [top_p] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # cache row k holds prompt order[k]
    sorted_prompts = [prompts[i] for i in order]
    need = [budgets[i] > 0 for i in order]
    wanted, logits, plps = _prefill(model, sorted_prompts, need, prompt_logprobs, prefill_chunk)

    first = [
        RowUpdate(order[k], [], [], None if need[k] else "length", plps[k] if prompt_logprobs else None)
        for k in range(len(order))
    ]
    if not wanted:
        yield first
        return
    # Decode state of the active rows, which occupy cache rows 0..A-1.
    model.cache.keep_rows(wanted)
    rows = [order[k] for k in wanted]  # the prompt index of each active row
    left = [budgets[i] for i in rows]  # tokens each may still make
    pos_host = [len(prompts[i]) for i in rows]  # where each row's next token goes
    cap = max(len(prompts[i]) + budgets[i] for i in rows) - 1  # last position any row may use
    pos = torch.tensor(pos_host, device=device)
    # Sampling settings of the active rows: one pair for all, or a tensor of each per row.
    shared = len({(temps[i], top_ps[i]) for i in rows}) == 1
    row_temp = torch.tensor([temps[i] for i in rows], device=device, dtype=torch.float)
    row_top_p = torch.tensor([top_ps[i] for i in rows], device=device, dtype=torch.float)
    pending, pending_lp = [], []
    updates = {u.row: u for u in first}
    while True:
        if shared:
            token = sample(logits, temps[rows[0]], top_ps[rows[0]], rng)
        else:
            token = sample_rows(logits, row_temp, row_top_p, rng)
        pending.append(token)
        if logprobs:
            pending_lp.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0])
        if len(pending) == sync_every or len(pending) == max(left):
            new = torch.stack(pending, 1).tolist()
            new_lp = torch.stack(pending_lp, 1).tolist() if logprobs else [[] for _ in rows]
            pending, pending_lp = [], []
            keep = []
            for a, row in enumerate(rows):
                u = updates.get(row) or RowUpdate(row, [], [])
                if row in cancel:
                    u.finish_reason = "cancelled"
                for t, lp in zip(new[a], new_lp[a] or [None] * len(new[a])):
                    if u.finish_reason:
                        break
                    if t in stop:
                        u.finish_reason = "stop"
                        break
                    u.tokens.append(t)
                    if logprobs:
                        u.logprobs.append(lp)
                    left[a] -= 1
                    if left[a] == 0:
                        u.finish_reason = "length"
                        break
                updates[row] = u
                if u.finish_reason is None:
                    keep.append(a)
            yield list(updates.values())
            updates = {}
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows stop costing work
                model.cache.keep_rows(keep)
                index = torch.tensor(keep, device=device)
                token, pos, row_temp, row_top_p = token[index], pos[index], row_temp[index], row_top_p[index]
                rows, left, pos_host = [rows[a] for a in keep], [left[a] for a in keep], [pos_host[a] for a in keep]
        logits = decode(model, token, pos, pos_host)
        # Between syncs a finished row may run past its budget: it keeps rewriting its last position.
        pos_host = [min(p + 1, cap) for p in pos_host]
        pos = (pos + 1).clamp_(max=cap)
