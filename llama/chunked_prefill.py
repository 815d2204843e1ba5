"""Chunked prefill beside a running batch: a long prompt goes through the model one chunk at a
time, between the batch's decode steps, so that the running streams wait about one chunk per
step instead of the whole prefill.

The prompt's keys and values build up in a one-row cache of its own (the batch's cache is left
alone: a compiled decode step writes padding rows at position 0 of the rows past the batch, and
rows move when others leave). When only its last chunk is left, it joins the batch like any new
row (`Batch.add` with this as the row's prefix): its cache row is copied in and the last chunk
runs there, which gives the logits of its last token.
"""

from typing import List, Optional

import torch

from llama.model import KVCache, Transformer
from llama.prefix_cache import PrefixCache


class StagedPrefill:
    """One prompt's prefill, `chunk` tokens per `step`, starting after its prefix-cache match."""

    def __init__(self, model: Transformer, prompt: List[int], chunk: int, prefix_cache: Optional[PrefixCache] = None):
        self.model, self.prompt, self.chunk = model, list(prompt), chunk
        self.cache = model.new_cache()
        self.cache.reserve(1, len(self.prompt))
        self.length = 0  # positions [0, length) of its cache row are made
        if prefix_cache is not None:
            hit = prefix_cache.match(self.prompt)
            hit.load(self.cache, 0)
            self.length = hit.length

    @property
    def remaining(self) -> int:
        """Prompt tokens not yet run."""
        return len(self.prompt) - self.length

    @torch.inference_mode()
    def step(self) -> None:
        """Run the next chunk (never the prompt's last token: that one runs when the row joins)."""
        n = min(self.chunk, self.remaining - 1)
        assert n > 0, "the last chunk runs in Batch.add"
        tokens = torch.tensor([self.prompt[self.length : self.length + n]], device=self.model.device)
        batch_cache = self.model.cache
        self.model.use_cache(self.cache)
        try:
            self.model.hidden(tokens, self.length)
        finally:
            self.model.use_cache(batch_cache)
        self.length += n

    def load(self, cache: KVCache, row: int) -> None:
        """Copy the positions made so far into cache row `row`."""
        for mine, theirs in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            theirs[row, :, : self.length] = mine[0, :, : self.length]
