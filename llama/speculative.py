"""Speculative decoding: cheap proposals of the next k tokens, checked by the target model in one
forward pass of k + 1 tokens per row, with exactly the target model's answers.

- Proposers: prompt lookup (`NgramProposer`: the tokens that followed an earlier occurrence of
  the last few tokens, in the prompt and the answer so far: of several, the one whose preceding
  tokens agree longest with the history's, so an answer that copies its prompt keeps its place
  in it) and a draft model (`DraftProposer`: a smaller model with the same tokenizer and its own
  KV cache).
- `Speculator`: the proposer, k (fixed, or adaptive per row: it grows while proposals are
  accepted and shrinks when they are not) and the statistics (`SpeculativeStats`).
- `verify`: greedy rows accept the longest prefix equal to the target's argmax, then take the
  target's next token; sampled rows use the rejection rule of Leviathan et al. 2023 / Chen et al.
  2023 (accept draft token x with probability min(1, p(x)/q(x)), else draw from
  normalize(max(0, p - q))), so every token has exactly the target's distribution. Prompt
  lookup's q is one-hot. Temperature and top-p shape p and q as llama.sampling does.
- `SpeculativeBatch`: a `Batch` whose step proposes, verifies and hands out 1..k+1 tokens per row.
  It looks at the tokens every step (rows advance by different counts).

Every model-parallel rank runs the same proposals and draws from the same generator, so all ranks
accept the same tokens. A draft model is sharded like the target (see `load_draft` in
llama.generation).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama.batch import Batch, RowUpdate, prefill
from llama.model import Transformer
from llama.prefix_cache import PrefixCache
from llama.sampling import SamplingParams, sample, sample_rows

NGRAM = "ngram"
START_K = 4  # adaptive k: the first proposal's length
MAX_K = 15  # adaptive k: the longest proposal (k + 1 = 16 rows, the widest the CPU kernels take: native.MAX_ROWS)
REST_AFTER = 2  # adaptive k: verifications in a row with nothing accepted before a row rests from proposing
MAX_REST = 16  # adaptive k: most steps a row rests from proposing after proposals that all failed
NGRAM_SIZES = (3, 2)  # prompt lookup matches the last 3 tokens, else the last 2
MAX_CONTEXT = 16  # prompt lookup: tokens before a match compared to choose among its occurrences
MAX_OCCURRENCES = 64  # prompt lookup: the latest occurrences of a match compared (a bounded cost)
UNSUPPORTED = ("speculative decoding samples with temperature and top_p only: seed, top_k, min_p, the penalties, "
               "logit_bias and top_logprobs need a generator built without speculative")


def unsupported_field(params: SamplingParams) -> Optional[str]:
    """The first sampling option of `params` that speculative decoding does not apply, or None."""
    defaults = SamplingParams()
    for name in ("seed", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "logit_bias", "top_logprobs"):
        if getattr(params, name) != getattr(defaults, name):
            return name
    return None


@dataclass
class SpeculativeStats:
    """Counts since the engine was made (or `reset`)."""

    proposed: int = 0  # draft tokens offered for verification
    accepted: int = 0  # of them, accepted
    row_forwards: int = 0  # rows verified (one target forward of a batch counts each of its rows)
    tokens: int = 0  # tokens those verifications made (accepted drafts + the target's own token)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0.0 before any proposal)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens each row gets per target forward (1.0 is plain decoding; 0.0 before any)."""
        return self.tokens / self.row_forwards if self.row_forwards else 0.0

    def reset(self) -> None:
        self.proposed = self.accepted = self.row_forwards = self.tokens = 0


def check_speculative_tokens(k) -> Optional[int]:
    """`k` if it is None (adaptive) or an int >= 1; otherwise a ValueError."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"speculative_tokens must be an int >= 1 (tokens proposed per step), or None for "
                         f"adaptive; got {k!r}")
    return k


def check_same_tokenizer(target, draft) -> None:
    """Raise ValueError unless the draft's tokenizer is the target's: the same vocabulary size,
    special ids and pieces."""
    if target.n_words != draft.n_words:
        raise ValueError(f"the draft model's tokenizer has {draft.n_words} tokens, the target's {target.n_words}: "
                         "a draft must share the target's tokenizer (Code Llama 7B drafts for 13B/34B/70B)")
    for name in ("bos_id", "eos_id", "prefix_id", "middle_id", "suffix_id", "eot_id", "step_id"):
        if getattr(target, name, None) != getattr(draft, name, None):
            raise ValueError(f"the draft model's tokenizer differs from the target's ({name}): "
                             "a draft must share the target's tokenizer")
    for t in range(target.n_words):
        if target.token_piece(t) != draft.token_piece(t):
            raise ValueError(f"the draft model's tokenizer differs from the target's at id {t} "
                             f"({draft.token_piece(t)!r}, not {target.token_piece(t)!r}): "
                             "a draft must share the target's tokenizer")


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution llama.sampling draws from: softmax(logits / temperature), then (top_p < 1)
    only the most likely tokens whose preceding cumulative probability is at most top_p,
    renormalised. logits (A, ..., V); temperature, top_p (A,) (temperature 0: clamped, as
    sample_rows does; greedy rows do not use these probabilities)."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6).view(shape), dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort.masked_fill_(probs_sum - probs_sort > top_p.view(shape), 0.0)
    nucleus = torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)
    nucleus.div_(nucleus.sum(dim=-1, keepdim=True))
    return torch.where(top_p.view(shape) >= 1, probs, nucleus)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """An index per row of probs (A, V), drawn with probability proportional to it (the exponential
    race, as llama.sampling draws)."""
    e = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / e, dim=-1)


def accept_mask(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The rejection rule: accept a draft token of target probability p and draft probability q
    when u < p / q, u ~ U(0, 1) (probability min(1, p/q))."""
    return u * q < p


def verify(logits: torch.Tensor, drafts: torch.Tensor, q: Optional[torch.Tensor], k: torch.Tensor,
           temperature: torch.Tensor, top_p: torch.Tensor, generator: Optional[torch.Generator],
           all_greedy: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check each row's draft tokens against the target.

    logits (A, K+1, V): the target's logits after the row's last token and after each draft token;
    drafts (A, K): proposed tokens (row a's first k[a] are real, the rest padding); q (A, K, V):
    the draft's probabilities of them (None: one-hot, for prompt lookup); temperature, top_p (A,);
    all_greedy: every temperature is 0 (known on the host: a shortcut).
    Returns (accepted (A,): how many leading drafts each row keeps, next (A,): the token after them,
    the target's own)."""
    rows, width = drafts.shape
    arange = torch.arange(rows, device=drafts.device)
    real = torch.arange(width, device=drafts.device) < k[:, None]  # (A, K)
    greedy = temperature == 0
    best = logits.argmax(-1)  # (A, K+1)
    greedy_ok = (drafts == best[:, :width]) & real
    if all_greedy:  # no probabilities needed, no random numbers drawn
        accepted = greedy_ok.long().cumprod(-1).sum(-1)
        return accepted, best[arange, accepted]
    p = filtered_probs(logits, temperature, top_p)  # (A, K+1, V)
    if q is None:
        q = F.one_hot(drafts, p.shape[-1]).to(p.dtype)
    q = q * real[..., None]  # padding proposes nothing: its residual is p itself
    p_draft = p[:, :width].gather(-1, drafts[..., None])[..., 0]
    q_draft = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand((rows, width), generator=generator, device=drafts.device)
    sampled_ok = accept_mask(p_draft, q_draft, u) & real
    ok = torch.where(greedy[:, None], greedy_ok, sampled_ok)
    accepted = ok.long().cumprod(-1).sum(-1)  # (A,)
    # After a rejection: normalize(max(0, p - q)) at the rejected position; after all: p after the last.
    residual = torch.cat([(p[:, :width] - q).clamp(min=0), p[:, width:]], dim=1)[arange, accepted]
    fallback = p[arange, accepted]  # p == q exactly leaves no residual (a rejection of probability 0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, fallback)
    nxt = torch.where(greedy, best[arange, accepted], draw(residual, generator))
    return accepted, nxt


def agreement(history: Sequence[int], i: int, j: int) -> int:
    """How many tokens before positions i and j of history agree, counting back (at most MAX_CONTEXT)."""
    n = 0
    while n < MAX_CONTEXT and i - 1 - n >= 0 and history[i - 1 - n] == history[j - 1 - n]:
        n += 1
    return n


def continuation(history: Sequence[int], start: int, k: int) -> List[int]:
    """k tokens from history[start:], going on past its end as history does from start (a copy that
    overlaps itself, as in LZ77: a pattern that repeats proposes k tokens, not the few left)."""
    period = len(history) - start
    return [history[start + t % period] for t in range(k)]


def lookup(history: Sequence[int], k: int, sizes: Sequence[int] = NGRAM_SIZES) -> List[int]:
    """Prompt lookup: k tokens (`continuation`) after an earlier occurrence of the last n tokens of
    history (n from `sizes`, longest first); [] when none occurs. Of the latest MAX_OCCURRENCES
    occurrences, the one whose preceding tokens agree longest with those before the last n (the
    latest of equals): where an answer copies from, not a look-alike line elsewhere. (The
    reference for `NgramIndex`, which finds the same occurrences without a scan.)"""
    history = list(history)
    for n in sizes:
        tail, end = history[-n:], len(history) - n
        found = [i for i in range(end - 1, -1, -1) if history[i : i + n] == tail][:MAX_OCCURRENCES]
        if found:
            best = max(found, key=lambda i: (agreement(history, i, end), i))
            return continuation(history, best + n, k)
    return []


class NgramIndex:
    """Where each n-gram of a growing history started (among those followed by a token), so that a
    lookup costs the same whatever the history's length (at most MAX_OCCURRENCES comparisons of
    at most MAX_CONTEXT tokens)."""

    def __init__(self, sizes: Sequence[int] = NGRAM_SIZES):
        self.sizes = sizes
        self.starts: Dict[int, Dict[tuple, List[int]]] = {n: {} for n in sizes}  # n-gram -> its starts, ascending
        self.indexed = {n: 0 for n in sizes}  # n-grams starting before this are in starts[n]

    def lookup(self, history: List[int], k: int) -> List[int]:
        """`lookup(history, k)`, from the index (brought up to date with history first)."""
        for n in self.sizes:
            starts = self.starts[n]
            for i in range(self.indexed[n], len(history) - n):  # n-grams followed by a token
                starts.setdefault(tuple(history[i : i + n]), []).append(i)
            self.indexed[n] = max(self.indexed[n], len(history) - n)
            found = starts.get(tuple(history[-n:])) if len(history) > n else None
            if found:
                end, best, most = len(history) - n, None, -1
                for i in reversed(found[-MAX_OCCURRENCES:]):  # latest first: it wins ties
                    agree = agreement(history, i, end)
                    if agree > most:
                        best, most = i, agree
                        if agree == MAX_CONTEXT:
                            break
                return continuation(history, best + n, k)
        return []


class NgramProposer:
    """Proposals from the prompt and the answer so far (no model)."""

    def __init__(self):
        self.index: Dict[int, NgramIndex] = {}  # row key -> its history's n-grams

    def add(self, batch: "SpeculativeBatch", row0: int, prompts: List[List[int]]) -> None:
        for key in batch.rows.keys[row0:]:
            self.index[key] = NgramIndex()

    def keep_rows(self, keep: List[int]) -> None:
        pass

    def forget(self, key: int) -> None:
        self.index.pop(key, None)

    def propose(self, batch: "SpeculativeBatch", ks: List[int]) -> Tuple[List[List[int]], Optional[torch.Tensor]]:
        """(up to ks[a] tokens per row, None: their draft distribution is one-hot)."""
        return [self.index[key].lookup(batch.history[key], k) if k else []
                for key, k in zip(batch.rows.keys, ks)], None


class DraftProposer:
    """Proposals from a draft model with its own KV cache, its rows in the batch's cache-row order.

    Each step the draft first catches up on the tokens it has not seen (1 or 2: the accepted ones
    it did not propose itself, and the target's own), then proposes K tokens one at a time."""

    def __init__(self, model: Transformer):
        self.model = model
        self.seen: Dict[int, int] = {}  # row key -> how many of its history's tokens the draft cache holds

    def add(self, batch: "SpeculativeBatch", row0: int, prompts: List[List[int]]) -> None:
        """Prefill the joining rows (cache rows row0.., in `prompts` order, sorted by length)."""
        target = batch.model.cache
        self.model.reserve_cache(target.batch_size, target.seq_len)
        prefill(self.model, prompts, [True] * len(prompts), False, batch.prefill_chunk, row0)
        for key, p in zip(batch.rows.keys[row0:], prompts):
            self.seen[key] = len(p)

    def keep_rows(self, keep: List[int]) -> None:
        self.model.cache.keep_rows(keep)

    def propose(self, batch: "SpeculativeBatch", ks: List[int]) -> Tuple[List[List[int]], Optional[torch.Tensor]]:
        """(max(ks) tokens for every row, their draft probabilities (A, K, V); None when every row
        is greedy)."""
        width, keys, r = max(ks), batch.rows.keys, batch.rows
        device = self.model.device
        last = [len(batch.history[key]) - 1 for key in keys]  # position of each row's newest token
        catch_up = max(p + 1 - self.seen[key] for p, key in zip(last, keys))
        # Every row feeds its last `catch_up` tokens, ending at its newest one: a row that had
        # fewer unseen tokens rewrites positions it already holds, with the same keys and values.
        tokens = torch.tensor([batch.history[key][p + 1 - catch_up : p + 1] for p, key in zip(last, keys)],
                              device=device)
        start = torch.tensor([p + 1 - catch_up for p in last], device=device)
        rows = slice(0, len(keys))
        h = self.model.hidden(tokens, start, kv_len=max(last) + 1, rows=rows)
        logits = self.model.logits(h[:, -1])
        greedy, all_greedy = r.row_temp == 0, max(r.temps) == 0
        drafts, probs = [], []
        for i in range(width):
            if all_greedy:  # greedy verification needs no draft probabilities
                token = logits.argmax(-1)
            else:
                q = filtered_probs(logits, r.row_temp, r.row_top_p)
                token = torch.where(greedy, logits.argmax(-1), draw(q, batch.rng))
                probs.append(q)
            drafts.append(token)
            if i + 1 < width:
                h = self.model.hidden(token[:, None], start + catch_up + i, kv_len=max(last) + 2 + i, rows=rows)
                logits = self.model.logits(h[:, -1])
        for p, key in zip(last, keys):
            self.seen[key] = p + width  # its newest token and drafts 1..K-1 (refined by `accepted`)
        return torch.stack(drafts, 1).tolist(), torch.stack(probs, 1) if probs else None

    def accepted(self, keys: List[int], last: List[int], accepted: List[int], width: int) -> None:
        """After verification: the draft cache is right up to the last accepted draft it fed."""
        for key, p, n in zip(keys, last, accepted):
            self.seen[key] = p + 1 + min(n, width - 1)

    def forget(self, key: int) -> None:
        self.seen.pop(key, None)


class Speculator:
    """What a speculative engine proposes with (prompt lookup, or a draft model), its k (None:
    adaptive), and its statistics."""

    def __init__(self, draft: Optional[Transformer] = None, tokens: Optional[int] = None):
        self.draft = draft
        self.tokens = check_speculative_tokens(tokens)
        self.stats = SpeculativeStats()

    def proposer(self):
        """The proposer of a new batch (the draft's cache serves one batch at a time)."""
        return NgramProposer() if self.draft is None else DraftProposer(self.draft)


def adapt_k(k: int, misses: int, proposed: int, accepted: int) -> Tuple[int, int, int]:
    """Adaptive k after a verification of `proposed` tokens: (next k, misses, steps to rest).

    k grows by 2 (to MAX_K) when every proposal is accepted, else becomes one more than were. After
    `misses` >= REST_AFTER verifications in a row of which nothing was accepted, the row rests
    2, 4, .. MAX_REST steps without proposing: a verify pass of several tokens costs more than a
    pass of one where compute, not memory, bounds it (a CPU), and text unlike its prompt stays
    unlike it. One miss alone does not rest the row: an answer that copies its prompt with an
    edit misses once at the edit, then copies again."""
    k = min(k + 2, MAX_K) if accepted == proposed else max(1, accepted + 1)
    misses = 0 if accepted else misses + 1
    return k, misses, min(2 ** (misses - REST_AFTER + 1), MAX_REST) if misses >= REST_AFTER else 0


class SpeculativeBatch(Batch):
    """A Batch whose step proposes tokens, verifies them in one target forward per step and hands
    out every row's accepted tokens; stop ids, budgets and logprobs work as in Batch.

    State per row: its history (prompt + tokens made), whose newest token has not yet been fed to
    the target (its first token is sampled from the prefill's logits, as Batch does)."""

    def __init__(self, speculator: Speculator, model: Transformer, stop_ids: Sequence[int],
                 rng: Optional[torch.Generator], logprobs: bool = False, prefill_chunk: int = 2048,
                 prefix_cache: Optional[PrefixCache] = None):
        super().__init__(model, None, stop_ids, rng, logprobs, prefill_chunk, prefix_cache)
        self.speculator = speculator
        self.proposer = speculator.proposer()
        self.history: Dict[int, List[int]] = {}
        self.started: set = set()  # rows whose newest history token is a generated one
        self.k: Dict[int, int] = {}  # adaptive k per row
        self.misses: Dict[int, int] = {}  # adaptive: proposals in a row of which nothing was accepted
        self.rest: Dict[int, int] = {}  # adaptive: steps the row still waits before proposing again

    def add(self, keys: List[int], prompts: List[List[int]], budgets: List[int], params: Sequence[SamplingParams],
            prompt_logprobs: bool = False, prefixes: Optional[list] = None) -> List[RowUpdate]:
        """Batch.add, and the joining rows' histories (and draft cache rows)."""
        for p in params:
            if unsupported_field(p):
                raise ValueError(f"{unsupported_field(p)}: {UNSUPPORTED}")
        row0 = len(self)
        updates = super().add(keys, prompts, budgets, params, prompt_logprobs, prefixes)
        by_key = dict(zip(keys, prompts))
        joined = [list(by_key[key]) for key in self.rows.keys[row0:]]
        for key, p in zip(self.rows.keys[row0:], joined):
            self.history[key] = list(p)
            self.k[key] = self.speculator.tokens or START_K
            self.misses[key] = self.rest[key] = 0
        if joined:
            self.proposer.add(self, row0, joined)
        return updates

    @torch.inference_mode()
    def drop(self, keys) -> None:
        """Batch.drop, for the draft's cache rows and the rows' histories too."""
        keep = [a for a, k in enumerate(self.rows.keys) if k not in keys]
        if keep and len(keep) < len(self):
            self.proposer.keep_rows(keep)
        for key in keys:
            self.history.pop(key, None)
            self.k.pop(key, None)
            self.misses.pop(key, None)
            self.rest.pop(key, None)
            self.started.discard(key)
            self.proposer.forget(key)
        super().drop(keys)

    @torch.inference_mode()
    def step(self, sync: bool = True) -> List[RowUpdate]:
        """Every row gets 1..k+1 tokens (always a sync: rows advance by different counts)."""
        updates = {key: RowUpdate(key, [], []) for key in self.rows.keys}
        new = [a for a, key in enumerate(self.rows.keys) if key not in self.started]
        if new:
            self._first_tokens(new, updates)
        if self.rows.keys:
            self._speculate(updates)
        return list(updates.values())

    def _first_tokens(self, new: List[int], updates: Dict[int, RowUpdate]) -> None:
        """Sample joining rows' first tokens from their prefill logits, as Batch.step does."""
        r = self.rows
        index = torch.tensor(new, device=self.model.device)
        logits = r.logits[index]
        temps, top_ps = [r.temps[a] for a in new], [r.top_ps[a] for a in new]
        if len(set(zip(temps, top_ps))) == 1:
            token = sample(logits, temps[0], top_ps[0], self.rng)
        else:
            token = sample_rows(logits, r.row_temp[index], r.row_top_p[index], self.rng)
        lps = torch.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0].tolist() if self.logprobs else None
        done = []
        for j, (a, t) in enumerate(zip(new, token.tolist())):
            key = r.keys[a]
            self.started.add(key)
            if self._emit(a, [t], [lps[j]] if lps else [None], updates[key]):
                done.append(key)
        self.drop(done)

    def _speculate(self, updates: Dict[int, RowUpdate]) -> None:
        """Propose, verify in one target forward, hand out the accepted tokens and the next one."""
        r, stats = self.rows, self.speculator.stats
        keys = r.keys
        last = [len(self.history[key]) - 1 for key in keys]  # position of each row's unfed token
        room = min(self.model.cache.seq_len - 1 - p for p in last)  # padding must stay in the cache
        ks = [0 if self.rest[key] else max(0, min(self.k[key], left - 1, room)) for key, left in zip(keys, r.left)]
        drafts, q = self.proposer.propose(self, ks) if max(ks) > 0 else ([[] for _ in keys], None)
        ks = [min(k, len(d)) for k, d in zip(ks, drafts)]
        width = max(ks)
        device = self.model.device
        padded = [list(d[:width]) + [0] * (width - len(d[:width])) for d in drafts]
        tokens = torch.tensor([[self.history[key][-1]] + d for key, d in zip(keys, padded)], device=device)
        start = torch.tensor(last, device=device)
        h = self.model.hidden(tokens, start, kv_len=max(last) + width + 1, rows=slice(0, len(keys)))
        logits = self.model.logits(h)  # (A, K+1, V)
        if q is not None:
            q = q[:, :width]
        k_dev = torch.tensor(ks, device=device)
        accepted, nxt = verify(logits, tokens[:, 1:], q, k_dev, r.row_temp, r.row_top_p, self.rng,
                               all_greedy=max(r.temps) == 0)
        # The tokens made: accepted drafts, then the target's next token at index `accepted`.
        j = torch.arange(width + 1, device=device)
        made = torch.where(j < accepted[:, None], torch.cat([tokens[:, 1:], tokens[:, :1]], 1), nxt[:, None])
        lps = None
        if self.logprobs:
            lps = torch.log_softmax(logits, dim=-1).gather(-1, made[..., None])[..., 0].tolist()
        accepted, made = accepted.tolist(), made.tolist()
        if width and isinstance(self.proposer, DraftProposer):  # width 0: the draft fed nothing
            self.proposer.accepted(keys, last, accepted, width)
        done = []
        for a, key in enumerate(list(keys)):
            n = accepted[a]
            stats.proposed += ks[a]
            stats.accepted += n
            stats.row_forwards += 1
            stats.tokens += n + 1
            if self.speculator.tokens is None:
                self.adapt(key, ks[a], n)
            if self._emit(a, made[a][: n + 1], lps[a][: n + 1] if lps else [None] * (n + 1), updates[key]):
                done.append(key)
        self.drop(done)
        r = self.rows
        r.pos_host = [len(self.history[key]) - 1 for key in r.keys]
        r.pos = torch.tensor(r.pos_host, device=device, dtype=torch.long)

    def adapt(self, key: int, proposed: int, accepted: int) -> None:
        """Adaptive k after a step of the row (`adapt_k`), or one step less of rest."""
        if self.rest[key]:
            self.rest[key] -= 1
        elif proposed:
            self.k[key], self.misses[key], self.rest[key] = adapt_k(self.k[key], self.misses[key], proposed, accepted)

    def _emit(self, a: int, tokens: List[int], lps: List[Optional[float]], u: RowUpdate) -> bool:
        """Hand row a's new tokens to its update until a stop id or its budget; True when it is done."""
        for t, lp in zip(tokens, lps):
            if t in self.stop:
                u.finish_reason = "stop"
                return True
            u.tokens.append(t)
            if self.logprobs:
                u.logprobs.append(lp)
            self.history[u.row].append(t)
            self.rows.left[a] -= 1
            if self.rows.left[a] == 0:
                u.finish_reason = "length"
                return True
        return False
