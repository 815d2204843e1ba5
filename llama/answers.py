"""One answer's tokens turned into text as they arrive: text deltas that can no longer change,
stop strings, the hold-back of text that may begin one, token offsets, and the final `Result`.

Used by `Llama`'s streams and by the server's scheduler; it returns deltas and results and
leaves sending them to its caller.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from llama.batch import RowUpdate
from llama.tokenizer import StreamDecoder


@dataclass
class Result:
    """What one answer came to."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    stop_type: str = "eos"  # llama.cpp: "eos", "limit" or "word"
    stopping_word: str = ""
    tokens: List[str] = field(default_factory=list)  # with logprobs: pieces
    logprobs: List[float] = field(default_factory=list)
    offsets: List[int] = field(default_factory=list)  # where each token's text starts
    token_ids: List[int] = field(default_factory=list)  # with logprobs: the tokens' ids
    top_logprobs: List[List[Tuple[str, float]]] = field(default_factory=list)  # with top-N: (piece, logprob)
    top_ids: List[List[int]] = field(default_factory=list)  # with top-N: the alternatives' ids


class Answer:
    """The text of one answer, built from its RowUpdates.

    decode: the tokenizer's decode for this kind of answer (decode_infilling for a middle);
    piece: token id -> its piece, for logprobs; stop: strings that end the answer before them."""

    def __init__(self, decode: Callable[[List[int]], str], piece: Callable[[int], str] = str,
                 stop: Sequence[str] = (), logprobs: bool = False, prompt_tokens: int = 0):
        self.decoder = StreamDecoder(decode)
        self.piece, self.stop, self.logprobs, self.prompt_tokens = piece, list(stop), logprobs, prompt_tokens
        self.text = ""
        self.scanned = 0  # characters of text known to hold no stop string
        self.sent = 0  # characters of text handed out
        self.tokens = 0
        self.pieces: List[str] = []
        self.token_logprobs: List[float] = []
        self.offsets: List[int] = []
        self.ids: List[int] = []
        self.tops: List[List[Tuple[int, float]]] = []

    def add(self, u: RowUpdate) -> Tuple[str, Optional[Result]]:
        """(the new text that can no longer change, possibly "", the Result once the answer is
        complete: at a stop token, its budget, or a stop string, whichever comes first)."""
        tops = u.top_logprobs or [[] for _ in u.tokens]
        for token, lp, top in zip(u.tokens, u.logprobs or [None] * len(u.tokens), tops):
            self.offsets.append(len(self.text))
            self.text += self.decoder.push(token)
            self.tokens += 1
            if self.logprobs:
                self.pieces.append(self.piece(token))
                self.token_logprobs.append(lp)
                self.ids.append(token)
                self.tops.append(top)
        if u.finish_reason is not None:
            self.text += self.decoder.flush()
        cut, word = self._first_stop()
        if cut >= 0:
            self.text = self.text[:cut]
        done = cut >= 0 or u.finish_reason is not None
        # Text that could still turn out to begin a stop string is held back.
        hold = 0 if done else max((len(s) - 1 for s in self.stop), default=0)
        ready = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent : ready], ready
        if not done:
            return delta, None
        stop_type = "word" if cut >= 0 else ("eos" if u.finish_reason == "stop" else "limit")
        kept = [i for i, o in enumerate(self.offsets) if o < len(self.text)] if self.logprobs else []
        return delta, Result(
            self.text, "length" if stop_type == "limit" else "stop", self.prompt_tokens, self.tokens,
            stop_type, word, [self.pieces[i] for i in kept], [self.token_logprobs[i] for i in kept],
            [self.offsets[i] for i in kept], [self.ids[i] for i in kept],
            [[(self.piece(t), lp) for t, lp in self.tops[i]] for i in kept],
            [[t for t, _ in self.tops[i]] for i in kept],
        )

    def _first_stop(self) -> Tuple[int, str]:
        """(where the earliest stop string starts in the text, which one), or (-1, ""). Only the
        text that new characters could complete is searched, so a step costs what it added."""
        found = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, self.scanned - len(s) + 1))) >= 0]
        self.scanned = len(self.text)
        return min(found, key=lambda f: f[0]) if found else (-1, "")
