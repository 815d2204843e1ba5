"""A running batch: rows that join (their prompts prefilled between steps), take decode steps
together, and leave when they finish; and the batched prefill with its length grouping.

- Prefill: prompts are sorted by length and grouped so that padding a group to its longest prompt
  wastes little; each group goes through the model in one pass (in chunks for long prompts) and
  only the logits that are needed are computed.
- Decode: rows advance at their own positions; the host looks at the new tokens only on a sync
  step (to stop rows, and to hand tokens out), and rows that have finished are dropped then.

Every model-parallel rank runs the same batch on the same inputs and draws the same tokens, so
all ranks take the same decisions without talking to each other.
"""

from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama.model import Transformer
from llama.prefix_cache import Hit, PrefixCache
from llama.sampling import SamplingParams, process_logits, row_generator, sample, sample_processed, sample_rows


@dataclass
class RowUpdate:
    """New output of one row of a batch."""

    row: int  # the caller's key of the row (the prompt's index, for Engine.complete)
    tokens: List[int]  # tokens made since its last update (a stop token is not included)
    logprobs: List[float]  # their log-probabilities (empty unless asked for)
    finish_reason: Optional[str] = None  # "stop" (a stop token) or "length" (its budget) once done
    prompt_logprobs: Optional[List[float]] = None  # in the first update, when asked for
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None  # per token, its row's top-N (id, logprob)


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


def token_logprobs(model: Transformer, h: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> List[float]:
    """log p(targets[t] | ...) from hidden states h (T, dim), `chunk` positions of logits at a time."""
    out = []
    for s in range(0, h.shape[0], chunk):
        lp = F.log_softmax(model.logits(h[s : s + chunk]), dim=-1)
        out.append(lp.gather(1, targets[s : s + chunk, None])[:, 0])
    return torch.cat(out).tolist() if out else []


def prefill(
    model: Transformer, prompts: List[List[int]], need_logits: List[bool], prompt_logprobs: bool, chunk: int,
    row0: int = 0, starts: Optional[List[int]] = None,
) -> Tuple[List[int], Optional[torch.Tensor], List[List[float]]]:
    """Run the prompts, sorted by (start, length), through the model, writing cache rows
    row0..row0+n-1. starts: where each row's prefill begins (its positions before that are in
    the cache already); rows with the same start are grouped. Prompt log-probabilities need
    start 0.

    Returns (the indices k with need_logits[k], the logits (len, V) of their last prompt token,
    per-prompt log-probabilities of tokens 1.. when asked)."""
    starts = [0] * len(prompts) if starts is None else starts
    assert not prompt_logprobs or not any(starts), "prompt log-probabilities need every position run"
    lengths = [len(p) for p in prompts]
    last_h: List[Optional[torch.Tensor]] = [None] * len(prompts)
    lps: List[List[float]] = [[] for _ in prompts]
    for group in start_groups(starts, lengths):
        if not prompt_logprobs and not any(need_logits[k] for k in group):
            continue
        begin = starts[group.start]
        width = max(lengths[k] for k in group) - begin
        tokens = torch.zeros((len(group), width), dtype=torch.long)  # right-padded, made on the host
        for j, k in enumerate(group):
            tokens[j, : lengths[k] - begin] = torch.tensor(prompts[k][begin:], dtype=torch.long)
        tokens = tokens.to(model.device)  # one copy to the device, not one per row
        # Padding only ever follows a row's prompt, so causal attention keeps it out of the prompt.
        for s in range(0, width, chunk):
            h = model.hidden(tokens[:, s : s + chunk], begin + s, rows=slice(row0 + group.start, row0 + group.stop))
            for j, k in enumerate(group):
                if s <= lengths[k] - begin - 1 < s + chunk:
                    last_h[k] = h[j, lengths[k] - begin - 1 - s]
                if prompt_logprobs:
                    n = min(h.shape[1], lengths[k] - 1 - s)  # positions whose next token is in the prompt
                    if n > 0:
                        lps[k] += token_logprobs(model, h[j, :n], tokens[j, s + 1 : s + 1 + n])
    wanted = [k for k in range(len(prompts)) if need_logits[k]]
    logits = model.logits(torch.stack([last_h[k] for k in wanted])) if wanted else None
    return wanted, logits, lps


def start_groups(starts: Sequence[int], lengths: Sequence[int]) -> List[range]:
    """prefill_groups within each run of rows (sorted by start, then length) that start alike."""
    groups, a = [], 0
    for b in range(1, len(starts) + 1):
        if b == len(starts) or starts[b] != starts[a]:
            groups += [range(a + g.start, a + g.stop) for g in prefill_groups([n - starts[a] for n in lengths[a:b]])]
            a = b
    return groups


@dataclass
class Rows:
    """Per-row state of a batch, one entry per active row in cache-row order: host lists and
    device tensors, kept in step by `select` and `extend` only."""

    keys: List[int]  # the caller's id of the row
    left: List[int]  # tokens it may still make
    pos_host: List[int]  # where its next token goes
    cap: List[int]  # the last position it may use
    temps: List[float]
    top_ps: List[float]
    logits: Optional[torch.Tensor] = None  # (A, V): the distribution of each row's next token
    pos: Optional[torch.Tensor] = None  # (A,) pos_host on the device
    row_cap: Optional[torch.Tensor] = None  # (A,) cap on the device
    row_temp: Optional[torch.Tensor] = None  # (A,) temps on the device
    row_top_p: Optional[torch.Tensor] = None  # (A,) top_ps on the device
    tops: List[int] = field(default_factory=list)  # how many most likely tokens to report (top_logprobs)
    plain: List[bool] = field(default_factory=list)  # SamplingParams.plain
    generators: List[Optional[torch.Generator]] = field(default_factory=list)  # a seeded row's own
    # The logit processors (llama.sampling.process_logits), None while every row has been plain:
    row_top_k: Optional[torch.Tensor] = None  # (A,) long
    row_min_p: Optional[torch.Tensor] = None  # (A,)
    row_presence: Optional[torch.Tensor] = None  # (A,)
    row_frequency: Optional[torch.Tensor] = None  # (A,)
    row_repetition: Optional[torch.Tensor] = None  # (A,)
    bias: Optional[torch.Tensor] = None  # (A, V) logit_bias
    counts: Optional[torch.Tensor] = None  # (A, V) times each token was generated
    seen: Optional[torch.Tensor] = None  # (A, V) bool: in the prompt or generated

    def __post_init__(self):
        """Rows made without the sampling extras are plain rows with no top logprobs."""
        n = len(self.keys)
        self.tops = self.tops or [0] * n
        self.plain = self.plain or [True] * n
        self.generators = self.generators or [None] * n

    @staticmethod
    def empty() -> "Rows":
        return Rows([], [], [], [], [], [])

    @staticmethod
    def processors(prompts: List[List[int]], params: Sequence[SamplingParams], vocab: int,
                   device: torch.device) -> dict:
        """The logit-processor fields of new rows (defaults for plain rows)."""
        n = len(params)
        bias = torch.zeros((n, vocab))
        seen = torch.zeros((n, vocab), dtype=torch.bool)
        for b, (prompt, p) in enumerate(zip(prompts, params)):
            for token, value in p.logit_bias:
                bias[b, token] = value
            if p.repetition_penalty != 1:
                seen[b, torch.tensor(prompt, dtype=torch.long)] = True

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        return dict(
            row_top_k=column([p.top_k for p in params], torch.long), row_min_p=column([p.min_p for p in params]),
            row_presence=column([p.presence_penalty for p in params]),
            row_frequency=column([p.frequency_penalty for p in params]),
            row_repetition=column([p.repetition_penalty for p in params]),
            bias=bias.to(device), counts=torch.zeros((n, vocab), device=device), seen=seen.to(device),
        )

    def select(self, keep: List[int]) -> "Rows":
        """The rows at positions `keep`, in that order."""
        index = None
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                values[f.name] = [v[a] for a in keep]
            elif v is not None:
                index = torch.tensor(keep, device=v.device, dtype=torch.long) if index is None else index
                values[f.name] = v[index]
        return Rows(**values)

    def extend(self, new: "Rows") -> "Rows":
        """These rows followed by `new`."""
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(new, f.name)
            values[f.name] = a + b if isinstance(a, list) else (b if a is None else torch.cat([a, b]))
        return Rows(**values)


class Batch:
    """Rows being generated, one KV-cache row each (rows 0..len-1, in order). Rows join between
    steps (their prompts are prefilled then) and leave when they finish or are dropped.

    A step samples every row's next token; on a sync step the host reads the tokens made since the
    last sync, ends rows at a stop token or at their budget, and drops them; then the remaining
    rows' tokens go through the model. Rows that finish between syncs keep running until the next
    one (their extra tokens are discarded)."""

    def __init__(self, model: Transformer, decode: Callable, stop_ids: Sequence[int],
                 rng: Optional[torch.Generator], logprobs: bool = False, prefill_chunk: int = 2048,
                 prefix_cache: Optional[PrefixCache] = None):
        """decode: the one-step decoder (llama.decode); logprobs: report each token's log-probability;
        prefix_cache: where joining rows find their prompts' cached prefixes and leave their own."""
        self.model, self.decode, self.stop, self.rng = model, decode, set(stop_ids), rng
        self.prefix_cache = prefix_cache
        self.fed: Dict[int, List[int]] = {}  # with a prefix cache: key -> the tokens its cache row was fed
        self.logprobs, self.prefill_chunk = logprobs, prefill_chunk
        self.rows = Rows.empty()
        self.pending: List[torch.Tensor] = []  # tokens sampled since the last sync, (A,) each
        self.pending_lp: List[torch.Tensor] = []
        self.pending_top: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (values, indices) (A, K) each

    def __len__(self) -> int:
        return len(self.rows.keys)

    @property
    def keys(self) -> List[int]:
        """The caller's keys of the active rows."""
        return list(self.rows.keys)

    def add(self, keys: List[int], prompts: List[List[int]], budgets: List[int], params: Sequence[SamplingParams],
            prompt_logprobs: bool = False, prefixes: Optional[List[Optional[Hit]]] = None) -> List[RowUpdate]:
        """Prefill new rows (after a sync: no tokens may be pending). The cache must have room for
        len(self) + len(prompts) rows of each row's prompt + budget positions. Returns an update for
        each new row: its prompt log-probabilities when asked, and "length" for a zero budget.

        prefixes: per prompt, keys and values already made for its first tokens (anything with
        `length` and `load(cache, row)`, as llama.prefix_cache.Hit), or None: the prefix cache's
        longest match (none when prompt log-probabilities are asked for: they need every position)."""
        assert not self.pending, "rows join only right after a sync"
        prefixes = list(prefixes) if prefixes is not None else [None] * len(prompts)
        pc = self.prefix_cache
        for i, p in enumerate(prompts):
            if prefixes[i] is None and pc is not None and not prompt_logprobs:
                prefixes[i] = pc.match(p)
        starts = [0 if h is None else h.length for h in prefixes]
        order = sorted(range(len(prompts)), key=lambda i: (starts[i], len(prompts[i])))
        need = [budgets[i] > 0 for i in order]
        row0 = len(self)
        for k, i in enumerate(order):
            if starts[i]:
                prefixes[i].load(self.model.cache, row0 + k)
        wanted, logits, lps = prefill(self.model, [prompts[i] for i in order], need, prompt_logprobs,
                                      self.prefill_chunk, row0, [starts[i] for i in order])
        if pc is not None:  # rows whose prompt ran (a zero budget's may not have)
            for k, i in enumerate(order):
                if need[k] or prompt_logprobs:
                    pc.store(prompts[i], self.model.cache, row0 + k)
        updates = [RowUpdate(keys[order[k]], [], [], None if need[k] else "length", lps[k] if prompt_logprobs else None)
                   for k in range(len(order))]
        if not wanted:
            return updates
        self.model.cache.keep_rows(list(range(row0)) + [row0 + k for k in wanted])
        joining = [order[k] for k in wanted]
        device = self.model.device
        positions = [len(prompts[i]) for i in joining]
        caps = [len(prompts[i]) + budgets[i] - 1 for i in joining]
        temps = [params[i].temperature for i in joining]
        top_ps = [params[i].top_p for i in joining]
        joined = [params[i] for i in joining]
        new = Rows(
            keys=[keys[i] for i in joining], left=[budgets[i] for i in joining], pos_host=positions, cap=caps,
            temps=temps, top_ps=top_ps, logits=logits, pos=torch.tensor(positions, device=device),
            row_cap=torch.tensor(caps, device=device), row_temp=torch.tensor(temps, device=device),
            row_top_p=torch.tensor(top_ps, device=device), tops=[p.top_logprobs for p in joined],
            plain=[p.plain for p in joined],
            generators=[None if p.seed is None else row_generator(p.seed, device) for p in joined],
        )
        self._add_processors(new, [prompts[i] for i in joining], joined)
        self.rows = self.rows.extend(new)
        if pc is not None:
            self.fed.update((keys[i], list(prompts[i])) for i in joining)
        return updates

    def _add_processors(self, new: Rows, prompts: List[List[int]], params: List[SamplingParams]) -> None:
        """Give `new` (and, the first time, the rows already here) the logit-processor tensors, once
        any row needs them."""
        if self.rows.bias is None and all(new.plain):
            return
        vocab, device = new.logits.shape[-1], self.model.device
        if self.rows.bias is None:  # the rows already here are plain: defaults
            plain = SamplingParams(max_gen_len=0)
            for name, value in Rows.processors([[]] * len(self), [plain] * len(self), vocab, device).items():
                setattr(self.rows, name, value)
        for name, value in Rows.processors(prompts, params, vocab, device).items():
            setattr(new, name, value)

    @torch.inference_mode()
    def drop(self, keys) -> None:
        """Remove rows (by key) right after a sync; the others move up in the cache."""
        keep = [a for a, k in enumerate(self.rows.keys) if k not in keys]
        if len(keep) == len(self):
            return
        self._store_prefixes(keys)
        if keep:
            self.model.cache.keep_rows(keep)
        self.rows = self.rows.select(keep)

    def _store_prefixes(self, keys) -> None:
        """Keep the leaving rows' prompts and answers (as far as their cache rows hold them, short
        of the last position a row past its budget rewrites) in the prefix cache."""
        if self.prefix_cache is None:
            return
        for a, key in enumerate(self.rows.keys):
            if key in keys:
                n = min(len(self.fed[key]), self.rows.pos_host[a], self.rows.cap[a])
                self.prefix_cache.store(self.fed.pop(key)[:n], self.model.cache, a)

    @torch.inference_mode()
    def step(self, sync: bool) -> List[RowUpdate]:
        """Sample every row's next token; on a sync, the updates of every row (finished rows are
        dropped); then feed the tokens of the rows still running."""
        r = self.rows
        if not all(r.plain):
            logits = process_logits(r.logits, r.bias, r.counts, r.seen, r.row_presence, r.row_frequency,
                                    r.row_repetition)
            token = sample_processed(logits, r.row_temp, r.row_top_p, r.row_top_k, r.row_min_p, r.generators,
                                     self.rng)
            r.counts.scatter_add_(1, token[:, None], torch.ones_like(r.counts[:, :1]))
            r.seen.scatter_(1, token[:, None], True)
        elif len(set(zip(r.temps, r.top_ps))) == 1:
            token = sample(r.logits, r.temps[0], r.top_ps[0], self.rng)
        else:
            token = sample_rows(r.logits, r.row_temp, r.row_top_p, self.rng)
        self.pending.append(token)
        if self.logprobs:  # of the model's own distribution, before any logit processor
            lp = torch.log_softmax(r.logits.float(), dim=-1)
            self.pending_lp.append(lp.gather(1, token[:, None])[:, 0])
            if max(r.tops):
                self.pending_top.append(torch.topk(lp, max(r.tops), dim=-1))
        updates = []
        if sync or len(self.pending) >= max(r.left):
            updates, kept = self._sync()
            if kept is not None:
                token = token[kept]
        r = self.rows
        if r.keys:
            r.logits = self.decode(token, r.pos, r.pos_host)
            # A row past its end (not yet seen by a sync) keeps rewriting its last position.
            r.pos_host = [min(p + 1, c) for p, c in zip(r.pos_host, r.cap)]
            r.pos = torch.minimum(r.pos + 1, r.row_cap)
        return updates

    def _sync(self) -> Tuple[List[RowUpdate], Optional[torch.Tensor]]:
        """(an update per row, the positions of the rows still running, None when all are); drops
        the finished rows."""
        new = torch.stack(self.pending, 1).tolist()
        new_lp = torch.stack(self.pending_lp, 1).tolist() if self.logprobs else [[] for _ in new]
        top_lp = torch.stack([v for v, _ in self.pending_top], 1).tolist() if self.pending_top else None
        top_ids = torch.stack([i for _, i in self.pending_top], 1).tolist() if self.pending_top else None
        self.pending, self.pending_lp, self.pending_top = [], [], []
        if self.prefix_cache is not None:  # each row was fed all but its last token, fed next if it stays
            for key, tokens in zip(self.rows.keys, new):
                self.fed[key] += tokens
        updates, done = [], set()
        for a, key in enumerate(self.rows.keys):
            n_top = self.rows.tops[a] if top_ids is not None else 0
            u = RowUpdate(key, [], [], top_logprobs=[] if n_top else None)
            for s, (t, lp) in enumerate(zip(new[a], new_lp[a] or [None] * len(new[a]))):
                if t in self.stop:
                    u.finish_reason = "stop"
                    break
                u.tokens.append(t)
                if self.logprobs:
                    u.logprobs.append(lp)
                if n_top:
                    u.top_logprobs.append(list(zip(top_ids[a][s][:n_top], top_lp[a][s][:n_top])))
                self.rows.left[a] -= 1
                if self.rows.left[a] == 0:
                    u.finish_reason = "length"
                    break
            updates.append(u)
            if u.finish_reason:
                done.add(key)
        if not done:
            return updates, None
        kept = torch.tensor([a for a, k in enumerate(self.rows.keys) if k not in done],
                            device=self.model.device, dtype=torch.long)
        self.drop(done)
        return updates, kept
