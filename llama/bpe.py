"""Byte-level BPE behind the one tokenizer interface (llama.tokenizer.TokenizerProtocol), run by
Hugging Face's `tokenizers`: GGUF "gpt2" vocabularies rebuilt from their tokens and merges, split
into words as llama.cpp splits them for the file's `tokenizer.ggml.pre`, and tokenizer.json files
as they are.

Special tokens written in a text (<|im_start|>) become their ids, as in transformers and llama.cpp:
that is how a rendered chat template is encoded.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

CONTROL, USER_DEFINED = 3, 4  # token types, as llama.cpp and sentencepiece number them

# Tokens that end a chat turn, by their text, in the order they are looked for when a checkpoint
# does not name one (llama.cpp finds its end-of-turn token the same way).
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass(frozen=True)
class WordSplit:
    """How a text is cut into words before BPE: llama.cpp's regular expressions for one
    `tokenizer.ggml.pre`, applied in turn (each one cuts the pieces the one before left)."""

    regexes: Tuple[str, ...]
    ignore_merges: bool = False  # a word that is a whole token is that token, whatever the merges say


# llama.cpp's regular expressions (src/llama-vocab.cpp), for the `pre` names that code models use.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORD_SPLITS: Dict[str, WordSplit] = {
    "default": WordSplit((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "gpt-2": WordSplit((GPT2,)),
    "phi-2": WordSplit((GPT2,)),
    "mpt": WordSplit((GPT2,)),
    "olmo": WordSplit((GPT2,)),
    "jais": WordSplit((GPT2,)),
    # one digit per word, then GPT-2's words
    "starcoder": WordSplit((r"\p{N}", GPT2)),
    "refact": WordSplit((r"\p{N}", GPT2)),
    "command-r": WordSplit((r"\p{N}", GPT2)),
    "smollm": WordSplit((r"\p{N}", GPT2)),
    "codeshell": WordSplit((r"\p{N}", GPT2)),
    "exaone": WordSplit((r"\p{N}", GPT2)),
    "falcon": WordSplit((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")),
    "llama3": WordSplit((LLAMA3,), ignore_merges=True),
    "llama-v3": WordSplit((LLAMA3,), ignore_merges=True),
    "llama-bpe": WordSplit((LLAMA3,), ignore_merges=True),
    "falcon3": WordSplit((LLAMA3,), ignore_merges=True),
    "dbrx": WordSplit((LLAMA3,)),
    "smaug-bpe": WordSplit((LLAMA3,)),
    "qwen2": WordSplit((QWEN2,)),
    "deepseek-r1-qwen": WordSplit((QWEN2,)),
    "stablelm2": WordSplit((QWEN2,)),
    "deepseek-coder": WordSplit(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
}


def byte_alphabet() -> Dict[int, str]:
    """GPT-2's spelling of bytes as printable characters (a space is "Ġ", a newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str) -> Backend:
    """A `tokenizers` byte-level BPE from a GGUF vocabulary (llama.cpp's "gpt2" tokenizer model).

    Args:
        tokens: the vocabulary, in id order, spelled in GPT-2's byte alphabet.
        merges: "left right" pairs, best first.
        token_types: per token; CONTROL tokens become special tokens and USER_DEFINED ones added
            tokens, both matched whole in a text.
        pre: `tokenizer.ggml.pre`, which names how a text is cut into words (WORD_SPLITS).
    """
    if pre not in WORD_SPLITS:
        raise ValueError(
            f"the GGUF vocabulary's pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{', '.join(sorted(WORD_SPLITS))}. Load the model's tokenizer.json instead (pass tokenizer_path)"
        )
    split = WORD_SPLITS[pre]
    alphabet = set(byte_alphabet().values())
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the GGUF vocabulary lists a token twice: the file is damaged; download it again")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=split.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # A token spelled outside the byte alphabet would be added under a new id: such a mislabelled
    # token stays an ordinary one (transformers skips it too).
    whole = [(t, kind) for t, kind in zip(tokens, token_types)
             if kind in (CONTROL, USER_DEFINED) and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in whole if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in whole if kind == USER_DEFINED])
    assert backend.get_vocab_size(with_added_tokens=True) == len(tokens)
    return backend


def end_of_turn_id(backend: Backend) -> Optional[int]:
    """The id of the first special token in END_OF_TURN_TEXTS that the vocabulary has, or None."""
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    return next((backend.token_to_id(t) for t in END_OF_TURN_TEXTS if t in special), None)


class BPETokenizer:
    """A `tokenizers` vocabulary (byte-level BPE, or any tokenizer.json) behind the interface of
    llama.tokenizer.TokenizerProtocol. It has no infilling pieces and no <step> piece; encode and
    decode need no leading-space handling, so the infilling variants are plain encode and decode."""

    prefix_id = middle_id = suffix_id = step_id = None
    has_infilling = False

    def __init__(
        self, backend: Backend, bos_id: Optional[int], eos_id: int, pad_id: int = -1,
        eot_id: Optional[int] = None, add_bos: bool = False, chat_template: Optional[str] = None,
    ):
        """Args:
            backend: the `tokenizers` tokenizer; its own BOS/EOS post-processing is not used.
            bos_id, eos_id, pad_id: the special ids (bos_id None, pad_id -1: none).
            eot_id: the token that ends a chat turn, if the chat template ends turns with one.
            add_bos: whether the model's prompts start with BOS.
            chat_template: the checkpoint's Jinja chat template, if any.
        """
        self.backend = backend
        self.n_words: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id, self.eot_id = bos_id, eos_id, pad_id, eot_id
        self.add_bos, self.chat_template = add_bos, chat_template

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """The ids of `s` (special tokens written in it become their ids); BOS first and EOS last if asked."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode str, not {type(s).__name__}")
        if bos and self.bos_id is None:
            raise ValueError("this vocabulary has no BOS token; encode with bos=False")
        t = self.backend.encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: List[int]) -> str:
        """The text of `t`; -1 (padding) and special tokens add nothing. A character whose bytes are
        not all there yet decodes to U+FFFD."""
        return self.backend.decode([tk for tk in t if tk != -1], skip_special_tokens=True)

    def token_piece(self, t: int) -> str:
        """The vocabulary's spelling of token `t` ("Ġdef", "<|im_end|>")."""
        return self.backend.id_to_token(t)

    def encode_infilling(self, s: str) -> List[int]:
        """The ids of `s` (byte-level BPE adds no leading space to undo)."""
        return self.encode(s, bos=False, eos=False)

    def decode_infilling(self, t: List[int]) -> str:
        """The text of `t`, as decode."""
        return self.decode(t)
