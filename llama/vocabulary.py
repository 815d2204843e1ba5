"""Which tokenizer a checkpoint uses, read from the file that holds it: a sentencepiece
tokenizer.model (Meta's layout), a GGUF file's vocabulary, or a Hugging Face tokenizer.json.

A GGUF vocabulary is rebuilt from its metadata (llama.cpp's keys): a "llama" one as the
sentencepiece model it was converted from, so that it tokenizes exactly like Meta's
tokenizer.model; a "gpt2" one as byte-level BPE (llama/bpe.py). Every result offers
llama.tokenizer.TokenizerProtocol. `save_tokenizer` writes one into a folder as files this module
reads back (a quantized copy of a GGUF checkpoint carries its vocabulary that way).
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

import gguf
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import Tokenizer as Backend

from llama.bpe import BPETokenizer, byte_level_bpe, end_of_turn_id
from llama.files import open_gguf, read_json
from llama.tokenizer import Tokenizer, TokenizerProtocol

KEYS = gguf.Keys.Tokenizer
BYTE = int(gguf.TokenType.BYTE)
GGUF_VOCABULARIES = {"llama": "sentencepiece", "gpt2": "byte-level BPE"}  # tokenizer.ggml.model values read here


def load_tokenizer(tokenizer_path: Optional[str], ckpt_dir: str) -> TokenizerProtocol:
    """The tokenizer at `tokenizer_path` (a sentencepiece .model, a tokenizer.json or a .gguf file),
    or, when it is None, the one the checkpoint `ckpt_dir` carries (a .gguf file, or a folder with
    tokenizer.model, one .gguf file or tokenizer.json, looked for in that order)."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        return checkpoint_tokenizer(path) if path.is_dir() else tokenizer_file(path)
    return checkpoint_tokenizer(Path(ckpt_dir))


def tokenizer_file(path: Path) -> TokenizerProtocol:
    """The tokenizer in one file, by its name: *.gguf, *.json (Hugging Face), else sentencepiece."""
    if path.suffix in (".gguf", ".json") and not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {str(path)!r}; pass the checkpoint's {path.suffix} file")
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if path.suffix == ".json":
        return hf_tokenizer(path)
    return Tokenizer(str(path))


def checkpoint_tokenizer(where: Path) -> TokenizerProtocol:
    """The tokenizer of the checkpoint at `where`: a .gguf file, or a folder."""
    if where.is_file():
        return tokenizer_file(where)
    if (where / "tokenizer.model").is_file():
        return Tokenizer(str(where / "tokenizer.model"))
    ggufs = sorted(where.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ValueError(
            f"{str(where)!r} holds several GGUF files ({', '.join(p.name for p in ggufs[:4])}): pass the one "
            "to use as tokenizer_path"
        )
    if ggufs:
        return gguf_tokenizer(ggufs[0])
    if (where / "tokenizer.json").is_file():
        return hf_tokenizer(where / "tokenizer.json")
    raise FileNotFoundError(
        f"no tokenizer found with the checkpoint in {str(where)!r} (no tokenizer.model, .gguf file or "
        "tokenizer.json): pass tokenizer_path (for example CodeLlama-7b/tokenizer.model)"
    )


def save_tokenizer(tokenizer: TokenizerProtocol, folder: Path) -> None:
    """Write `tokenizer` into `folder` as the files `checkpoint_tokenizer(folder)` reads back as the
    same tokenizer: tokenizer.model for sentencepiece; for byte-level BPE, tokenizer.json with a
    tokenizer_config.json naming its special tokens, whether it starts with BOS and its chat template."""
    if isinstance(tokenizer, Tokenizer):
        (folder / "tokenizer.model").write_bytes(tokenizer.sp_model.serialized_model_proto())
        return
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"cannot write a {type(tokenizer).__name__} as tokenizer files")
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    name = tokenizer.backend.id_to_token
    config = {"eos_token": name(tokenizer.eos_id), "add_bos_token": tokenizer.add_bos}
    if tokenizer.bos_id is not None:
        config["bos_token"] = name(tokenizer.bos_id)
    if tokenizer.pad_id >= 0:
        config["pad_token"] = name(tokenizer.pad_id)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# GGUF ---------------------------------------------------------------------------------------------


def gguf_tokenizer(path: Path) -> TokenizerProtocol:
    """The tokenizer a GGUF file's metadata describes."""
    meta = {key: field.contents() for key, field in open_gguf(path).fields.items() if key.startswith("tokenizer.")}
    kind = meta.get(KEYS.MODEL)
    if kind not in GGUF_VOCABULARIES:
        known = ", ".join(f"{k!r} ({v})" for k, v in GGUF_VOCABULARIES.items())
        raise ValueError(
            f"{str(path)!r} has a {kind!r} vocabulary ({KEYS.MODEL}), which cannot be read here: supported are "
            f"{known}. Pass the model's tokenizer.model or tokenizer.json as tokenizer_path"
        )
    needed = [KEYS.LIST] + ([KEYS.SCORES, KEYS.TOKEN_TYPE] if kind == "llama" else [KEYS.EOS_ID])
    missing = [key for key in needed if key not in meta]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: the file is incomplete; download it again")
    if kind == "llama":
        try:
            return Tokenizer.from_proto(sentencepiece_proto(meta), add_bos=meta.get(KEYS.ADD_BOS, True))
        except RuntimeError as e:  # sentencepiece refuses an inconsistent vocabulary
            raise ValueError(f"the sentencepiece vocabulary in {str(path)!r} is inconsistent ({e})") from None
    backend = byte_level_bpe(meta[KEYS.LIST], meta.get(KEYS.MERGES, []), meta.get(KEYS.TOKEN_TYPE, []),
                             meta.get(KEYS.PRE, "default"))
    return BPETokenizer(
        backend, bos_id=meta.get(KEYS.BOS_ID), eos_id=meta[KEYS.EOS_ID], pad_id=meta.get(KEYS.PAD_ID, -1),
        eot_id=meta.get(KEYS.EOT_ID, end_of_turn_id(backend)), add_bos=meta.get(KEYS.ADD_BOS, False),
        chat_template=meta.get(KEYS.CHAT_TEMPLATE),
    )


def sentencepiece_proto(meta: Dict[str, Any]) -> bytes:
    """The sentencepiece model a GGUF "llama" vocabulary was converted from, as llama.cpp reads it:
    BPE over the pieces' scores, byte fallback when there are <0xNN> byte pieces, and Llama's
    normalizer (no normalization, a dummy prefix space unless add_space_prefix is false, spaces kept)."""
    tokens, scores, types = meta[KEYS.LIST], meta[KEYS.SCORES], meta[KEYS.TOKEN_TYPE]
    proto = sp_pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = sp_pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    special = (("unk", KEYS.UNK_ID, 0), ("bos", KEYS.BOS_ID, 1), ("eos", KEYS.EOS_ID, 2), ("pad", KEYS.PAD_ID, -1))
    for name, key, default in special:
        i = meta.get(key, default)
        setattr(spec, f"{name}_id", i)
        if 0 <= i < len(tokens):
            setattr(spec, f"{name}_piece", tokens[i])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = meta.get(KEYS.ADD_PREFIX, True)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


# Hugging Face tokenizer.json ----------------------------------------------------------------------


def hf_tokenizer(path: Path) -> BPETokenizer:
    """A Hugging Face tokenizer.json, with its special tokens and chat template from the files
    beside it (tokenizer_config.json, special_tokens_map.json, config.json, chat_template.jinja)."""
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{str(path)!r} is not a Hugging Face tokenizer.json ({e}); download it again") from None
    folder = path.parent
    config, tokens_map, model_config = (read_json_if_present(folder / name) for name in
                                        ("tokenizer_config.json", "special_tokens_map.json", "config.json"))

    def special_id(name: str) -> Optional[int]:
        for source in (config, tokens_map):
            token = source.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
        i = model_config.get(f"{name}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        return i if isinstance(i, int) else None

    bos_id, eos_id, pad_id = special_id("bos"), special_id("eos"), special_id("pad")
    if eos_id is None:
        raise ValueError(
            f"no end-of-sequence token named beside {str(path)!r}: tokenizer_config.json needs 'eos_token' (or "
            "config.json 'eos_token_id'); copy the model's tokenizer_config.json into the folder"
        )
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # the tokenizer's own post-processing says whether it starts with BOS
        add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return BPETokenizer(
        backend, bos_id=bos_id, eos_id=eos_id, pad_id=-1 if pad_id is None else pad_id,
        eot_id=end_of_turn_id(backend), add_bos=add_bos, chat_template=hf_chat_template(folder, config),
    )


def hf_chat_template(folder: Path, config: Dict[str, Any]) -> Optional[str]:
    """The chat template of a Hugging Face tokenizer: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or named templates of which "default" is the chat one)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def read_json_if_present(path: Path) -> Dict[str, Any]:
    """The JSON object in `path`, or {} if there is no such file."""
    if not path.is_file():
        return {}
    value = read_json(path, "download it again")
    return value if isinstance(value, dict) else {}
