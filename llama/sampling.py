"""Choosing the next token: greedy, or temperature and nucleus (top-p) sampling, and the
`SamplingParams` of a request, checked once where they are made.

Sampling draws with the exponential race (argmax of p / E with E ~ Exp(1)), an exact sample of
the distribution that, unlike torch.multinomial, never waits for the device. All randomness comes
from the torch.Generator passed in, which every model-parallel rank seeds alike."""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from llama.checks import check_int


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_temperature(temperature) -> float:
    """`temperature` if it is a finite number >= 0 (0 is greedy); otherwise a ValueError."""
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    return temperature


def check_top_p(top_p) -> float:
    """`top_p` if it is a number in (0, 1]; otherwise a ValueError."""
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return top_p


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled; every field is checked on construction (ValueError)."""

    temperature: float = 0.6  # 0 is greedy
    top_p: float = 0.9  # nucleus: sample from the most likely tokens whose probabilities add up to top_p
    max_gen_len: Optional[int] = None  # new tokens at most; None: as many as max_seq_len leaves
    logprobs: bool = False  # also report each new token's log-probability

    def __post_init__(self):
        if self.max_gen_len is not None:
            check_int("max_gen_len", self.max_gen_len, minimum=0)
        check_temperature(self.temperature)
        check_top_p(self.top_p)


def _race(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Index drawn with probability proportional to probs along the last dim, keepdim."""
    e = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / e, dim=-1, keepdim=True)


def sample_top_p(probs: torch.Tensor, p, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probabilities add up to more than p.

    probs: (B, V) -> token ids (B, 1); p: a float, or a (B, 1) tensor of one per row. Every token
    whose preceding cumulative probability already exceeds p is dropped, the rest renormalised."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort.masked_fill_(probs_sum - probs_sort > p, 0.0)  # not x[mask] = 0: that syncs a GPU with the host
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, _race(probs_sort, generator))


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return _race(probs, generator)[:, 0]
    return sample_top_p(probs, top_p, generator)[:, 0]


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Like `sample`, with a temperature and top_p per row ((B,) tensors; temperature 0 is greedy)."""
    greedy = torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sampled = sample_top_p(probs, top_p[:, None], generator)[:, 0]
    return torch.where(temperature == 0, greedy, sampled)
