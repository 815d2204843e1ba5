"""Which tokenizer a checkpoint uses: the file named, or the one the checkpoint carries.

`load_tokenizer` picks the reader by the file: a sentencepiece `tokenizer.model` (Meta's layout,
Code Llama's GGUFs), and more kinds as they are supported.
"""

from pathlib import Path
from typing import Optional

from llama.tokenizer import Tokenizer


def load_tokenizer(tokenizer_path: Optional[str], ckpt_dir: str) -> Tokenizer:
    """The tokenizer at `tokenizer_path`, or, when it is None, the one the checkpoint in `ckpt_dir`
    carries (its tokenizer.model)."""
    if tokenizer_path is not None:
        return Tokenizer(str(tokenizer_path))
    folder = Path(ckpt_dir)
    if (folder / "tokenizer.model").is_file():
        return Tokenizer(str(folder / "tokenizer.model"))
    raise FileNotFoundError(
        f"no tokenizer found with the checkpoint in {str(folder)!r}: pass tokenizer_path (for example "
        "CodeLlama-7b/tokenizer.model)"
    )
