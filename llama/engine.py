"""`Engine`: the model, its decode strategy, the sampling generator and the KV-cache fitting
behind one public seam, used by `Llama` (llama.generation) and by the server (llama.serving).

- `complete` runs prompts to the end in batches of at most max_batch_size;
- `stream` runs one prompt and yields its tokens as they are made;
- `open_batch` and `admit` serve continuous batching: rows join a running batch between steps.

Before any prompt runs, the engine checks it and fits the cache: it warns past the trained
context, refuses on CUDA what cannot fit, and has the decoder grow (or pick) its cache.
"""

import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from llama.batch import Batch, RowUpdate
from llama.checks import is_int
from llama.chunked_prefill import StagedPrefill
from llama.decode import CompiledDecode, EagerDecode
from llama.distributed import check_cuda_room
from llama.model import Transformer
from llama.prefix_cache import PrefixCache
from llama.sampling import SamplingParams
from llama.speculative import SpeculativeBatch, SpeculativeStats, Speculator


@dataclass
class Generation:
    """What one prompt produced."""

    tokens: List[int]  # generated ids (prompt + generated with echo), without the stop token
    logprobs: Optional[List[float]]  # log-probability of each of `tokens` (0.0 for the first prompt token)


def trained_context(rope_theta: float) -> int:
    """Longest sequence a Code Llama model was trained on: 16k tokens with the long-context rotary
    base (1e6; stable to about 100k), 4k with Llama 2's 1e4 (70B-Python and -Instruct)."""
    return 16384 if rope_theta >= 1e6 else 4096


class Engine:
    """Runs token prompts through one model-parallel rank's model. Every rank holds an Engine
    seeded alike and makes the same calls, so all ranks draw the same tokens."""

    def __init__(self, model: Transformer, seed: int = 1, compile: bool = False, prefill_chunk_size: int = 2048,
                 prefix_cache_mb: float = 0, speculator: Optional[Speculator] = None):
        """compile: decode with a torch.compile'd step on static caches (llama.decode);
        prefill_chunk_size: prompts go through the model at most this many tokens at a time;
        prefix_cache_mb: keep prompts' keys and values in a prefix cache of this many MiB (per
        process; 0: none) and reuse them for prompts that start alike (llama.prefix_cache);
        speculator: decode speculatively (llama.speculative; its verify step runs eagerly)."""
        if not isinstance(prefix_cache_mb, (int, float)) or isinstance(prefix_cache_mb, bool) or prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be a number of MiB >= 0 (0 turns the cache off), "
                             f"not {prefix_cache_mb!r}")
        self.model = model
        self.speculator = speculator
        self.prefix_cache: Optional[PrefixCache] = None
        self.use_prefix_cache(int(prefix_cache_mb * 2**20))
        self.rng = torch.Generator(device=model.device).manual_seed(seed)
        self.decoder = CompiledDecode(model) if compile else EagerDecode(model)
        self.prefill_chunk_size = prefill_chunk_size

    @property
    def max_seq_len(self) -> int:
        return self.model.params.max_seq_len

    @property
    def speculative_stats(self) -> Optional[SpeculativeStats]:
        """Acceptance rate and tokens per target forward of speculative decoding (None without)."""
        return None if self.speculator is None else self.speculator.stats

    @property
    def max_batch_size(self) -> int:
        return self.model.params.max_batch_size

    def check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        """Raise (TypeError, ValueError) unless every prompt is a non-empty list of in-vocabulary
        token ids no longer than max_seq_len."""
        if not isinstance(prompt_tokens, (list, tuple)):
            raise TypeError(f"prompt_tokens must be a list of lists of token ids, not {type(prompt_tokens).__name__}")
        max_seq_len, n_words = self.max_seq_len, self.model.params.vocab_size
        for i, p in enumerate(prompt_tokens):
            if not isinstance(p, (list, tuple)) or not all(is_int(t) for t in p):
                raise TypeError(f"prompt {i} must be a list of int token ids")
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (for example BOS)")
            if len(p) > max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, more than max_seq_len={max_seq_len}: shorten it or pass "
                    "a larger max_seq_len to Llama.build"
                )
            bad = [t for t in p if not 0 <= t < n_words]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {n_words}): {bad[:5]}")

    @torch.inference_mode()
    def complete(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, stop_ids: Sequence[int], echo: bool = False
    ) -> List[Generation]:
        """Continue every prompt until a stop id (not returned) or its budget, in batches of at
        most max_batch_size. echo: put the prompt (and, with logprobs, its log-probabilities)
        before the generated tokens."""
        self.check_prompts(prompts)
        out: List[Generation] = []
        for i in range(0, len(prompts), self.max_batch_size):
            batch = [list(p) for p in prompts[i : i + self.max_batch_size]]
            out += self._complete_batch(batch, params, stop_ids, echo)
        return out

    def stream(self, prompt: Sequence[int], params: SamplingParams, stop_ids: Sequence[int]) -> Iterator[RowUpdate]:
        """One prompt's updates, one per decode step, the last with its finish reason. The prompt
        is checked now (so a bad one raises here, not on the first next()); nothing runs before
        the first next()."""
        self.check_prompts([prompt])
        prompt = list(prompt)

        @torch.inference_mode()  # entered only while the generator runs, not between its yields
        def updates():
            for step in self._run([prompt], params, stop_ids, prompt_logprobs=False, sync_every=1):
                yield from step

        return updates()

    def use_prefix_cache(self, budget_bytes: int) -> None:
        """Batches opened from now on keep prompts in a new prefix cache of `budget_bytes` (0: none)."""
        self.prefix_cache = PrefixCache(budget_bytes) if budget_bytes > 0 else None

    def open_batch(self, stop_ids: Sequence[int], logprobs: bool) -> Batch:
        """An empty batch that rows can join (`admit`) and leave (`Batch.drop`) between steps."""
        if self.speculator is not None:
            return SpeculativeBatch(self.speculator, self.model, stop_ids, self.rng, logprobs, self.prefill_chunk_size,
                                    self.prefix_cache)
        return Batch(self.model, self.decoder, stop_ids, self.rng, logprobs, self.prefill_chunk_size,
                     self.prefix_cache)

    @torch.inference_mode()
    def admit(self, batch: Batch, keys: List[int], prompts: List[List[int]],
              params: Sequence[SamplingParams], prefixes: Optional[list] = None) -> List[RowUpdate]:
        """Prefill checked prompts into a running batch (after a sync step): their budgets, the
        cache fitted for every row, the join. prefixes: as Batch.add takes them (a StagedPrefill
        whose last chunk is left, say). Returns Batch.add's updates."""
        budgets = self._budgets(prompts, params)
        self._fit_cache(prompts, budgets, len(batch) + len(prompts), rows_may_join=True)
        return batch.add(keys, prompts, budgets, params, prefixes=prefixes)

    def start_prefill(self, prompt: List[int], chunk: int) -> StagedPrefill:
        """A checked prompt's prefill to run `chunk` tokens at a time beside a running batch, then
        `admit` with it as the prompt's prefix once `remaining` <= chunk."""
        return StagedPrefill(self.model, prompt, chunk, self.prefix_cache)

    # The generation core -------------------------------------------------------------------

    def _complete_batch(self, prompts: List[List[int]], params: SamplingParams, stop_ids: Sequence[int],
                        echo: bool) -> List[Generation]:
        tokens = [[] for _ in prompts]
        lps = [[] for _ in prompts]
        prompt_lps = [[] for _ in prompts]
        # On a GPU, looking at the tokens every step would stall the queue of kernels.
        sync_every = 8 if self.model.device.type == "cuda" else 1
        for updates in self._run(prompts, params, stop_ids, echo and params.logprobs, sync_every):
            for u in updates:
                tokens[u.row] += u.tokens
                lps[u.row] += u.logprobs
                if u.prompt_logprobs is not None:
                    prompt_lps[u.row] = u.prompt_logprobs
        out = []
        for i, prompt in enumerate(prompts):
            toks, lp = tokens[i], lps[i]
            if echo:
                toks = prompt + toks
                lp = [0.0] + prompt_lps[i] + lp
            out.append(Generation(toks, lp if params.logprobs else None))
        return out

    def _run(self, prompts: List[List[int]], params: SamplingParams, stop_ids: Sequence[int],
             prompt_logprobs: bool, sync_every: int) -> Iterator[List[RowUpdate]]:
        """Lists of RowUpdate (keyed by prompt index), every `sync_every` decode steps, until every
        row has finished (a caller may stop iterating earlier), for at most max_batch_size prompts."""
        budgets = self._budgets(prompts, [params] * len(prompts))
        self._fit_cache(prompts, budgets, len(prompts))
        batch = self.open_batch(stop_ids, params.logprobs)
        first = {u.row: u for u in batch.add(list(range(len(prompts))), prompts, budgets, [params] * len(prompts),
                                             prompt_logprobs)}
        steps = 0
        while batch:
            steps += 1
            updates = batch.step(sync=steps % sync_every == 0)
            if not updates:
                continue
            for u in updates:  # the first update of each row carries what add() said about it
                if u.row in first:
                    u.prompt_logprobs = first.pop(u.row).prompt_logprobs
            yield updates + list(first.values())
            first = {}
        if first:
            yield list(first.values())

    def _budgets(self, prompts: List[List[int]], params: Sequence[SamplingParams]) -> List[int]:
        """New tokens each prompt may get: its max_gen_len, and what max_seq_len leaves."""
        room = [self.max_seq_len - len(p) for p in prompts]
        return [r if sp.max_gen_len is None else min(sp.max_gen_len, r) for r, sp in zip(room, params)]

    def _fit_cache(self, prompts: List[List[int]], budgets: List[int], rows: int, rows_may_join: bool = False) -> None:
        """Make the decoder's KV cache ready for `rows` rows, the longest of which is a prompt + its
        budget (contents kept: rows already running stay). rows_may_join: more rows will join."""
        args = self.model.params
        longest, trained = max(len(p) for p in prompts), trained_context(args.rope_theta)
        if longest > trained:
            warnings.warn(
                f"a prompt of {longest} tokens is longer than the {trained} this model was trained on "
                f"(rope_theta={args.rope_theta:g}); quality may degrade"
            )
        seq_len = max(len(p) + b for p, b in zip(prompts, budgets))
        cache, rows = self.decoder.cache_for(rows, rows_may_join)
        shape = cache.planned_shape(rows, seq_len)
        if shape != (cache.batch_size, cache.seq_len):
            check_cuda_room(
                cache.nbytes(*shape), self.model.device, f"the KV cache for {shape[0]} x {shape[1]} positions",
                "lower max_gen_len, the prompts' length or how many run together (max_batch_size)",
            )
        self.decoder.reserve(cache, rows, seq_len)
