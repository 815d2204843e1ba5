"""The one-step decoders: feed one token per active row and return the next logits.

`EagerDecode` runs the model as it is on a cache that grows with the work; `CompiledDecode`
runs a torch.compile'd step (CUDA graphs on a GPU) on static caches of a few size buckets. Each
also says which KV cache a batch of a given size decodes on, so that the engine can fit it.
"""

import types
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from llama.kernels import QuantizedWeight
from llama.model import KVCache, Transformer


def eager_step(model: Transformer, token: torch.Tensor, pos: torch.Tensor, pos_host: List[int]) -> torch.Tensor:
    """Logits (A, V) after feeding one token per active row (cache rows 0..A-1) at its position."""
    uniform = min(pos_host) == max(pos_host)
    start = pos_host[0] if uniform else pos  # a shared position needs no mask
    h = model.hidden(token[:, None], start, kv_len=max(pos_host) + 1, rows=slice(0, len(pos_host)))
    return model.logits(h[:, -1])


class EagerDecode:
    """The model's own step, on the model's one cache, grown as calls need."""

    def __init__(self, model: Transformer):
        self.model = model

    def cache_for(self, rows: int, rows_may_join: bool) -> Tuple[KVCache, int]:
        """(the cache a batch of `rows` rows decodes on, how many rows it must hold)."""
        if self.model.cache is None:
            self.model.use_cache(self.model.new_cache())
        return self.model.cache, rows

    def reserve(self, cache: KVCache, rows: int, seq_len: int) -> None:
        """Grow `cache` (from cache_for) to rows x seq_len and decode on it."""
        cache.reserve(rows, seq_len)
        self.model.use_cache(cache)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, pos_host: List[int]) -> torch.Tensor:
        return eager_step(self.model, token, pos, pos_host)


# Each (rows bucket, cache length) pair compiles the step once: up to 7 row buckets (max_batch_size
# 64) times 9 lengths (256 .. 64k). Past dynamo's default of 8 it would quietly run the step uncompiled
# over the whole static cache; past this limit it raises instead, so the fallback below says so.
RECOMPILE_LIMIT = 64
LIMITS = {name: value for name, value in {"recompile_limit": RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True}.items()
          if hasattr(torch._dynamo.config, name)}  # both exist since PyTorch 2.6


STEP_INPUTS = ("token", "pos", "length", "span")  # the compiled step's arguments
SERIAL_LOOP = 32768  # values a thread below which a compiled CPU loop runs on one thread


def guards_on_inputs(entries) -> List[bool]:
    """Which of dynamo's guards the compiled step keeps: those on its inputs (their shapes and
    dtypes), not the thousand on the model it reads (each module, weight and cache tensor: 0.5 ms
    a step on the CPU). Those hold by construction: each CompiledDecode compiles a code object of
    its own (dynamo keeps compiled code per code object), so its compiled steps only ever see its
    own model, whose weights are fixed once built; and the cache the step reads is the one the
    engine chose, of (rows, cache length) = (the rows of `token`, the length of `length`), so a
    different cache shape is a different input shape, and compiles. Should dynamo name its inputs
    otherwise, every guard is kept."""
    bracketed = tuple(f"L['{name}']" for name in STEP_INPUTS)  # dynamo's spelling before 2.13
    keep = [entry.name in STEP_INPUTS or entry.name.startswith(bracketed) for entry in entries]
    return keep if any(keep) else [True] * len(entries)


class CompiledDecode:
    """The decode step compiled with torch.compile for static shapes (CUDA graphs on a GPU).

    Each batch runs on a KV cache of its own size bucket (rows padded to a power of two, length
    rounded to a power of two), kept across calls at fixed addresses, and writes it in place. So
    each (rows, length) pair compiles once. On a GPU the step attends over the whole cache with a
    mask (fixed shapes, for CUDA graphs); on the CPU over the cache up to the batch's furthest
    position, a length the step is compiled for symbolically (reading the whole cache cost 0.6-1
    ms a token on the study model with 1024 positions cached and 64 used).
    If compilation fails, a warning says why and the eager step is used from then on."""

    def __init__(self, model: Transformer):
        self.model = model
        for module in model.modules():  # plain tensors, not parameters: their addresses are fixed too
            weight = getattr(module, "weight", None)
            if isinstance(weight, QuantizedWeight):
                torch._dynamo.mark_static_address(weight.data)
                torch._dynamo.mark_static_address(weight.scales)
                if weight.zeros is not None:
                    torch._dynamo.mark_static_address(weight.zeros)
        cuda = model.device.type == "cuda"
        self.attend_used = not cuda  # attend over the positions in use only (see above)
        # On the CPU a decode step is a few milliseconds, so its overhead counts: the step's wrapper
        # runs as C++ (not Python) and does not check every weight's size and stride on every call
        # (the shapes here are fixed by construction). Measured on the int8 study model: 10.2 -> 7.7
        # ms a token. And the step's own small loops (the embedding; norms, rotations, residuals and
        # cache writes where the blocks run rather than llama/layer_step.py's native call: a few
        # thousand values each) run on one thread: handing each to the thread pool cost more than it
        # saved (Inductor splits a loop of 512 values a thread; measured on the int4 study model, 2
        # threads, before the native call: 4.2 -> 3.8 ms a token).
        options = {"guard_filter_fn": guards_on_inputs}
        if not cuda:
            options.update({"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False,
                            "scalar_asserts": False, "cpp.min_chunk_size": SERIAL_LOOP})
        own = CompiledDecode._step  # as a function of this instance's own code object (see guards_on_inputs)
        step = types.FunctionType(own.__code__.replace(), own.__globals__, own.__name__, own.__defaults__)
        self.compiled = torch.compile(types.MethodType(step, self), mode="reduce-overhead" if cuda else None,
                                      dynamic=False, options=options)
        self.caches: Dict[int, KVCache] = {}
        self.broken: Optional[str] = None

    def cache_for(self, rows: int, rows_may_join: bool) -> Tuple[KVCache, int]:
        """(the static cache of this batch's bucket, its rows). rows_may_join: more rows will join
        the batch later, so it takes the largest bucket from the start."""
        rows = self.model.params.max_batch_size if rows_may_join else rows
        bucket = 1 << (rows - 1).bit_length()
        if bucket not in self.caches:
            self.caches[bucket] = self.model.new_cache(pow2=True)
        return self.caches[bucket], bucket

    def reserve(self, cache: KVCache, rows: int, seq_len: int) -> None:
        """Grow `cache` (from cache_for) to rows x seq_len and decode on it."""
        before = cache.k[0]
        cache.reserve(rows, seq_len)
        if cache.k[0] is not before:  # new tensors: tell the compiler their addresses are fixed
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        self.model.use_cache(cache)

    def _step(self, token: torch.Tensor, pos: torch.Tensor, length: torch.Tensor,
              span: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Only the lengths of `length` (the cache's) and `span` (how many cache positions to attend
        over; default all) are read."""
        model = self.model
        cache_len = length.shape[0]  # read, so that dynamo guards its (static) length
        h = model.hidden(token[:, None], pos, kv_len=cache_len if span is None else span.shape[0])
        return model.logits(h[:, -1])

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, pos_host: List[int]) -> torch.Tensor:
        if self.broken:
            return eager_step(self.model, token, pos, pos_host)
        n, rows = len(pos_host), self.model.cache.batch_size
        if rows > n:  # rows that are padding or finished write at position 0 of unused cache rows
            token = torch.cat([token, token.new_zeros(rows - n)])
            pos = torch.cat([pos, pos.new_zeros(rows - n)])
        # the cache's length, in the weights' dtype: a model converted after building (model.to)
        # is a new input dtype to the guards, and compiles anew
        length = torch.empty(self.model.cache.seq_len, dtype=self.model.output.weight.dtype, device=token.device)
        span = None
        if self.attend_used:  # at least 2: dynamo specialises lengths 0 and 1
            span = torch.empty(max(2, max(pos_host) + 1), dtype=torch.int8, device=token.device)
            torch._dynamo.mark_dynamic(span, 0)
        try:
            with torch._dynamo.config.patch(**LIMITS):
                return self.compiled(token, pos, length, span)[:n].clone()  # a CUDA graph's replay overwrites its output
        except Exception as e:  # compilation is best effort: any failure falls back to eager
            self.broken = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"compile=True: the decode step could not be compiled ({self.broken}); running eagerly")
            return eager_step(self.model, token[:n], pos[:n], pos_host)
