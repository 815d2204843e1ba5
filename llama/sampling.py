"""Choosing the next token: greedy, or temperature and nucleus (top-p) sampling, and the
`SamplingParams` of a request, checked once where they are made.

Sampling draws with the exponential race (argmax of p / E with E ~ Exp(1)), an exact sample of
the distribution that, unlike torch.multinomial, never waits for the device. All randomness comes
from the torch.Generator passed in, which every model-parallel rank seeds alike; a row with its
own seed draws only from its own generator (`row_generator`), so its sample does not depend on
the other rows of its batch.

Beyond temperature and top-p, a row may carry the OpenAI and vLLM logit processors, applied in
vLLM's order by `process_logits`: logit_bias, repetition_penalty (HF/vLLM: a seen token's
positive logit divided by it, a negative one multiplied), frequency_penalty and presence_penalty
(OpenAI: logit - count * frequency - (count > 0) * presence, over generated tokens), then
temperature, top_k and min_p (tokens less likely than min_p times the most likely one dropped).
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

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
    top_logprobs: int = 0  # and the log-probabilities of this many most likely tokens (needs logprobs)
    seed: Optional[int] = None  # draw from a generator of this seed, this row's alone
    top_k: int = 0  # sample among the k most likely tokens only; 0: all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    presence_penalty: float = 0.0  # OpenAI: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # HF/vLLM: divides (multiplies if negative) logits of prompt and output tokens
    logit_bias: Tuple[Tuple[int, float], ...] = ()  # (token id, bias added to its logit)

    def __post_init__(self):
        if self.max_gen_len is not None:
            check_int("max_gen_len", self.max_gen_len, minimum=0)
        check_temperature(self.temperature)
        check_top_p(self.top_p)
        check_int("top_logprobs", self.top_logprobs, minimum=0)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        check_int("top_k", self.top_k, minimum=0)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=-(2**63))
        _check_range("min_p", self.min_p, 0, 1)
        _check_range("presence_penalty", self.presence_penalty, -2, 2)
        _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a number > 0 (1: none), got {self.repetition_penalty!r}")
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2 and check_int("logit_bias token", pair[0], 0) >= 0):
                raise ValueError(f"logit_bias must hold (token id, bias) pairs, got {pair!r}")
            _check_range("logit_bias value", pair[1], -100, 100)

    @property
    def plain(self) -> bool:
        """True when only temperature and top_p shape the distribution, from the shared generator."""
        return (self.seed is None and self.top_k == 0 and self.min_p == 0 and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.repetition_penalty == 1 and not self.logit_bias)


def _check_range(name: str, value, low: float, high: float) -> None:
    if not _is_number(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}")


def row_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of a seeded row: the same seed gives the same draws on every rank and run."""
    return torch.Generator(device=device).manual_seed(seed % 2**64)


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


def process_logits(
    logits: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, presence: torch.Tensor,
    frequency: torch.Tensor, repetition: torch.Tensor,
) -> torch.Tensor:
    """The logits (B, V) after logit_bias (B, V), repetition_penalty (B,) over `seen` (B, V) bool
    (prompt and output tokens), frequency and presence penalties (B,) over `counts` (B, V) of
    output tokens. Identity for rows at the defaults."""
    x = logits.float() + bias
    rep = repetition[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    return x - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def sample_processed(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor,
    generators: Sequence[Optional[torch.Generator]], shared: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids (B,) from processed logits (B, V) with a temperature, top_p, top_k (0: all)
    and min_p per row ((B,) tensors). Row b draws from generators[b], or from `shared` if None."""
    greedy = torch.argmax(logits, dim=-1)
    x = logits / temperature.clamp(min=1e-6)[:, None]
    ordered = torch.sort(x, dim=-1, descending=True).values
    kth = ordered.gather(1, (top_k - 1).clamp(min=0)[:, None])
    x = x.masked_fill((top_k[:, None] > 0) & (x < kth), -math.inf)
    probs = torch.softmax(x, dim=-1)
    probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort.masked_fill_(probs_sum - probs_sort > top_p[:, None], 0.0)
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    noise = _noise(probs_sort, generators, shared)
    sampled = torch.gather(probs_idx, -1, torch.argmax(probs_sort / noise, dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature == 0, greedy, sampled)


def _noise(like: torch.Tensor, generators: Sequence[Optional[torch.Generator]],
           shared: Optional[torch.Generator]) -> torch.Tensor:
    """Exp(1) noise shaped like `like`: row b from generators[b], the others from `shared` (drawn
    for every row at once, so no index travels from the host; a seeded row's share is replaced)."""
    e = torch.empty_like(like).exponential_(1, generator=shared)
    for b, g in enumerate(generators):
        if g is not None:
            e[b].exponential_(1, generator=g)
    return e
