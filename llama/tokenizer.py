"""Tokenizers: the one interface every tokenizer offers (`TokenizerProtocol`), sentencepiece with
Code Llama's special pieces (`Tokenizer`), and `StreamDecoder` (text deltas of a growing token list).

Byte-level BPE vocabularies (GGUF "gpt2", Hugging Face tokenizer.json) live in llama/bpe.py; which
one a checkpoint uses is decided in llama/vocabulary.py.
"""

from pathlib import Path
from typing import Callable, List, Optional, Protocol

from sentencepiece import SentencePieceProcessor

# Pieces that only some Code Llama tokenizers have.
PREFIX_PIECE, MIDDLE_PIECE, SUFFIX_PIECE, EOT_PIECE = "▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"
STEP_PIECE = "<step>"  # ends a turn in the 70B Instruct dialog format
# Encoding "☺" + s and dropping the first two pieces ("▁", "☺") encodes s without sentencepiece's
# implicit leading space; this is how the infilling models were prompted.
SMILEY_PIECE = "☺"


class TokenizerProtocol(Protocol):
    """What every tokenizer offers; prompt formats, generation and the server use only this.

    Ids that a vocabulary lacks are None. `encode` never adds what was not asked for: bos=True
    adds BOS, eos=True adds EOS; `add_bos` says whether the model's prompts start with BOS (the
    prompt formats ask for it accordingly)."""

    n_words: int  # vocabulary size (the embedding's rows)
    bos_id: Optional[int]  # beginning of sequence
    eos_id: int  # end of sequence: every answer stops at it
    pad_id: int  # -1 when there is no pad token
    prefix_id: Optional[int]  # Code Llama's infilling pieces: ▁<PRE>, ▁<MID>, ▁<SUF>
    middle_id: Optional[int]
    suffix_id: Optional[int]
    eot_id: Optional[int]  # ends an infilled middle (▁<EOT>) or a templated chat turn (<|im_end|>)
    step_id: Optional[int]  # ends a turn in the 70B Instruct format (<step>)
    add_bos: bool  # whether the model's prompts start with BOS
    chat_template: Optional[str]  # the checkpoint's Jinja chat template; None: Code Llama's formats

    @property
    def has_infilling(self) -> bool:
        """Whether the vocabulary has Code Llama's four infilling pieces."""
        ...

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """The ids of `s` (special tokens written in it are plain text for sentencepiece, their ids
        for `tokenizers` vocabularies, as each library does), with BOS first and EOS last if asked."""
        ...

    def decode(self, t: List[int]) -> str:
        """The text of `t`; -1 (padding) and control tokens (BOS, EOS) add nothing."""
        ...

    def token_piece(self, t: int) -> str:
        """The vocabulary's spelling of token `t` ("▁def", "Ġdef", "<|im_end|>")."""
        ...

    def encode_infilling(self, s: str) -> List[int]:
        """The ids of `s` without an implicit leading space (a suffix or a middle)."""
        ...

    def decode_infilling(self, t: List[int]) -> str:
        """The text of `t` as written, a leading space kept (the inverse of encode_infilling)."""
        ...


class Tokenizer:
    """Sentencepiece, as Meta's reference reads tokenizer.model, with Code Llama's special pieces.

    `Tokenizer(model_path)` reads a tokenizer.model file; `Tokenizer.from_proto` takes the bytes of
    a sentencepiece model (llama/vocabulary.py rebuilds one from a GGUF vocabulary). Code Llama's
    chat formats are built in (llama/formats.py): a sentencepiece tokenizer carries no template."""

    chat_template: Optional[str] = None

    def __init__(self, model_path: str):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path!r}. Pass the tokenizer.model file that came "
                "with the checkpoint (for example --tokenizer_path CodeLlama-7b/tokenizer.model)."
            )
        try:
            sp_model = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{model_path!r} is not a sentencepiece model ({e}). Pass the tokenizer.model file of "
                "the checkpoint; if it is truncated, download it again."
            ) from None
        self._setup(sp_model, add_bos=True)

    @classmethod
    def from_proto(cls, model_proto: bytes, add_bos: bool = True) -> "Tokenizer":
        """The tokenizer of a serialized sentencepiece ModelProto (what tokenizer.model holds).

        Args:
            model_proto: the model's bytes.
            add_bos: whether the model's prompts start with BOS (Code Llama's do).
        """
        tokenizer = cls.__new__(cls)
        tokenizer._setup(SentencePieceProcessor(model_proto=model_proto), add_bos=add_bos)
        return tokenizer

    def _setup(self, sp_model: SentencePieceProcessor, add_bos: bool) -> None:
        self.sp_model = sp_model
        self.add_bos = add_bos
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 in the released models: there is no pad piece

        self.prefix_id: Optional[int] = self._piece_id(PREFIX_PIECE)
        self.middle_id: Optional[int] = self._piece_id(MIDDLE_PIECE)
        self.suffix_id: Optional[int] = self._piece_id(SUFFIX_PIECE)
        self.eot_id: Optional[int] = self._piece_id(EOT_PIECE)
        self.step_id: Optional[int] = self._piece_id(STEP_PIECE)
        self._smiley_id: Optional[int] = self._piece_id(SMILEY_PIECE)

    def _piece_id(self, piece: str) -> Optional[int]:
        """The id of `piece`, or None if the vocabulary lacks it (sentencepiece answers unk)."""
        i = self.sp_model.piece_to_id(piece)
        return None if i == self.sp_model.unk_id() else i

    @property
    def has_infilling(self) -> bool:
        """Whether the vocabulary has Code Llama's four infilling pieces."""
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """The ids of `s` with sentencepiece's implicit leading space; BOS first and EOS last if
        asked. Special pieces written in `s` ("<s>", "<PRE>") stay text."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode str, not {type(s).__name__}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        """The text of `t`; -1 (padding), BOS and EOS add nothing."""
        return self.sp_model.decode([tk for tk in t if tk != -1])

    def token_piece(self, t: int) -> str:
        """The piece of token `t` ("▁def", "<0x0A>", "<s>")."""
        return self.sp_model.id_to_piece(t)

    def encode_infilling(self, s: str) -> List[int]:
        """Encode a string without an implicit leading space."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode str, not {type(s).__name__}")
        self._require_smiley()
        return self.sp_model.encode(SMILEY_PIECE + s)[2:]

    def decode_infilling(self, t: List[int]) -> str:
        """Decode a string without removing a leading space (the inverse of encode_infilling)."""
        self._require_smiley()
        return self.sp_model.decode([self._smiley_id] + [tk for tk in t if tk != -1])[1:]

    def _require_smiley(self) -> None:
        if self._smiley_id is None:
            raise ValueError(f"this tokenizer has no {SMILEY_PIECE!r} piece, which infilling needs")


class StreamDecoder:
    """Text of a growing token list, handed out as deltas that join to exactly decode(all tokens).

    Each push decodes a short window of recent tokens and hands out what the new token added. Text
    that ends in an incomplete character (a multi-byte character split over byte-fallback or
    byte-level BPE tokens decodes to U+FFFD) is held back until the character is complete, or until
    `flush`."""

    def __init__(self, decode: Callable[[List[int]], str]):
        self.decode = decode
        self.tokens: List[int] = []
        self.start = 0  # first token of the window
        self.done = 0  # tokens whose text has been handed out

    def push(self, token: int) -> str:
        """Add one token; the text it completes (possibly "")."""
        self.tokens.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back (at the end of generation)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.decode(self.tokens[self.start : self.done])
        now = self.decode(self.tokens[self.start :])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.start, self.done = self.done, len(self.tokens)
        return now[len(before) :]
