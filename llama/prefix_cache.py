"""The prefix cache: keys and values of prompts already run, kept in fixed-size token blocks and
shared across requests, so that a prompt that starts like an earlier one prefills only the rest.

- Blocks hold BLOCK tokens of KV (every layer, this rank's KV heads). A block is indexed by its
  tokens and its parent block, a chain from the first token (as vLLM's block hashes, but exact:
  the key is the tokens themselves, so no two prefixes can collide).
- A lookup returns the longest chain of whole blocks that starts the prompt, never its last token
  (the prompt's last token is always run, so its logits exist).
- The store lives inside a byte budget: to make room it evicts the least recently used block that
  no other block continues, so a kept block's whole prefix is always kept.

Every decision depends only on token ids and the budget, never on timing, so model-parallel ranks
that see the same requests hold their own shards of the same blocks.

The running batch keeps its own contiguous KV cache (llama.model.KVCache): matched blocks are
copied into a row's positions [0, m) before its prefill starts at m (`Hit.load`), and a row's
whole blocks are copied out after its prefill (`PrefixCache.store`).
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llama.model import KVCache

# 16 tokens: an editor's next request shares all but the last few tokens of the previous prompt's
# prefix, and a block only counts when whole, so small blocks lose at most 15 tokens of reuse; the
# per-block cost (one dict entry, one copy per layer-stack) stays small next to 16 tokens of KV.
BLOCK = 16


@dataclass(eq=False)
class Block:
    """BLOCK tokens of keys and values, (n_layers, H_kv, BLOCK, D) each, after a parent block."""

    serial: int  # unique for the cache's lifetime: a child's key names its parent by it
    key: Tuple
    parent: Optional["Block"]
    k: torch.Tensor
    v: torch.Tensor
    children: int = 0


@dataclass
class Hit:
    """A matched prefix: `blocks` in order, `length` tokens in all."""

    blocks: List[Block] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.blocks) * BLOCK

    def load(self, cache: KVCache, row: int) -> None:
        """Copy the prefix's keys and values into positions [0, length) of cache row `row`."""
        if not self.blocks:
            return
        k = torch.cat([b.k for b in self.blocks], dim=2)  # (L, H_kv, length, D)
        v = torch.cat([b.v for b in self.blocks], dim=2)
        for i in range(len(cache.k)):
            cache.k[i][row, :, : self.length] = k[i]
            cache.v[i][row, :, : self.length] = v[i]


class PrefixCache:
    """Blocks of cached prefixes inside a byte budget, with least-recently-used eviction.

    Public counters (for /metrics): lookups, lookup_tokens (prompt tokens looked up), hit_tokens
    (of them, tokens found), stored_blocks, evicted_blocks; blocks and nbytes are what is held."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, not {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.index: Dict[Tuple, Block] = {}
        self.lru: "OrderedDict[int, Block]" = OrderedDict()  # serial -> block, oldest first
        self.serials = 0
        self.block_bytes = 0  # known once the first block is stored (every block has the same size)
        self.lookups = self.lookup_tokens = self.hit_tokens = 0
        self.stored_blocks = self.evicted_blocks = 0

    @property
    def blocks(self) -> int:
        """Blocks held now."""
        return len(self.lru)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held now."""
        return self.blocks * self.block_bytes

    def capacity(self, block_bytes: int) -> int:
        """How many blocks of `block_bytes` the budget holds."""
        return self.budget_bytes // block_bytes if block_bytes else 0

    def _chain(self, tokens: Sequence[int], n_blocks: int):
        """The held blocks that start `tokens`, at most n_blocks of them."""
        parent = None
        for b in range(n_blocks):
            block = self.index.get((parent.serial if parent else 0, tuple(tokens[b * BLOCK : (b + 1) * BLOCK])))
            if block is None:
                return
            yield block
            parent = block

    def peek(self, tokens: Sequence[int]) -> int:
        """Tokens a `match` would find now (counts nothing, changes nothing)."""
        return BLOCK * sum(1 for _ in self._chain(tokens, (len(tokens) - 1) // BLOCK))

    def match(self, tokens: Sequence[int]) -> Hit:
        """The longest held chain of whole blocks that starts `tokens`, short of its last token;
        its blocks become the most recently used."""
        hit = Hit(list(self._chain(tokens, (len(tokens) - 1) // BLOCK)))
        for block in hit.blocks:
            self.lru.move_to_end(block.serial)
        self.lookups += 1
        self.lookup_tokens += len(tokens)
        self.hit_tokens += hit.length
        return hit

    def store(self, tokens: Sequence[int], cache: KVCache, row: int) -> None:
        """Keep the whole blocks of `tokens`, whose keys and values are in positions [0, len) of
        cache row `row`: blocks already held become the most recently used, new ones are copied
        out, evicting the least recently used as the budget needs."""
        t = cache.k[0]
        block_bytes = 2 * len(cache.k) * t.shape[1] * BLOCK * t.shape[3] * t.element_size()
        assert self.block_bytes in (0, block_bytes), "every block of a cache has the same size"
        n_blocks = min(len(tokens) // BLOCK, self.capacity(block_bytes))
        if n_blocks == 0:
            return
        self.block_bytes = block_bytes
        chain: List[Block] = []
        parent = None
        for b in range(n_blocks):
            key = (parent.serial if parent else 0, tuple(tokens[b * BLOCK : (b + 1) * BLOCK]))
            block = self.index.get(key)
            if block is None:
                while self.blocks >= self.capacity(block_bytes):
                    self._evict(protect=chain)
                span = slice(b * BLOCK, (b + 1) * BLOCK)
                self.serials += 1
                block = Block(self.serials, key, parent, torch.stack([k[row, :, span] for k in cache.k]),
                              torch.stack([v[row, :, span] for v in cache.v]))
                self.index[key] = block
                self.lru[block.serial] = block
                if parent is not None:
                    parent.children += 1
                self.stored_blocks += 1
            chain.append(block)
            self.lru.move_to_end(block.serial)
            parent = block
        assert self.nbytes <= self.budget_bytes

    def _evict(self, protect: List[Block]) -> None:
        """Drop the least recently used block that no block continues (and not in `protect`)."""
        kept = {b.serial for b in protect}
        for serial, block in self.lru.items():
            if block.children == 0 and serial not in kept:
                break
        else:
            raise AssertionError("a store never holds more than the capacity in one chain")
        del self.lru[serial]
        del self.index[block.key]
        if block.parent is not None:
            block.parent.children -= 1
        self.evicted_blocks += 1

    def stats(self) -> Dict[str, int]:
        """The counters and what is held, by name (for /stats and /metrics)."""
        return {"lookups": self.lookups, "lookup_tokens": self.lookup_tokens, "hit_tokens": self.hit_tokens,
                "blocks": self.blocks, "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "block_tokens": BLOCK, "stored_blocks": self.stored_blocks, "evicted_blocks": self.evicted_blocks}

    def clear(self) -> None:
        """Drop every block (the counters stay)."""
        self.index.clear()
        self.lru.clear()


def default_budget_bytes(kv_bytes_of_a_batch: int) -> int:
    """The server's default budget: a quarter of what a full batch's KV cache may take (the
    memory estimate's KV line, llama.memory.kv_cache_bytes)."""
    return kv_bytes_of_a_batch // 4
