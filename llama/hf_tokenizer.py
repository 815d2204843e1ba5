"""The Hugging Face tokenizer files of a checkpoint whose vocabulary is a sentencepiece
tokenizer.model (Code Llama's): tokenizer.json, tokenizer_config.json and generation_config.json, as
`python -m llama.convert to-hf` writes them beside the weights.

How tokenizer.json is made, and why this way:

- It is built with Hugging Face's `tokenizers` (a dependency of this package already) from the
  pieces and scores in tokenizer.model, and serialized by that library: the file is by construction
  one that `tokenizers` (and so transformers, vLLM, TGI) reads. transformers' own converter
  (transformers.convert_slow_tokenizer) is the reference, but transformers is a test dependency
  only, and a conversion must not need a multi-hundred-MB library the runtime does not.
- The pipeline is the reference's for Llama's sentencepiece models (its LlamaConverter, "legacy"
  mode; the one in the tokenizer.json files Meta's Code Llama models are published with): BPE over
  the vocabulary with byte fallback; merges ranked as sentencepiece applies them (the pair whose
  merged piece has the highest score first, ties by piece id: SpmConverter's rule); a normalizer that
  puts sentencepiece's dummy prefix "▁" before the text and writes spaces as "▁". Unlike Metaspace
  pre-tokenization, that normalizer prefixes a text that already starts with a space (" x" is
  "▁▁x", as sentencepiece makes it), so indented code keeps its ids.
- Nothing is trusted: before anything is written, the built tokenizer encodes a sample (code with
  leading spaces, tabs, newlines and non-ASCII text, and the text of every piece of the vocabulary)
  and must give exactly the ids that sentencepiece gives (llama.tokenizer.Tokenizer.encode); a
  vocabulary it cannot reproduce is refused rather than converted wrongly. The tests compare the
  result with transformers' reference conversion and load it with AutoTokenizer.
- tokenizer_config.json names the generic `PreTrainedTokenizerFast`, which runs tokenizer.json as
  written. transformers 5's LlamaTokenizer and CodeLlamaTokenizer classes rebuild the pipeline from
  their own defaults (Metaspace, which adds no dummy prefix before a leading space): with them,
  "    return x" would not get sentencepiece's ids.

The special tokens are <unk>, <s>, </s>, and, where the vocabulary has them, the infilling pieces
▁<PRE> ▁<MID> ▁<SUF> ▁<EOT> and the 70B's <step>: single ids that transformers never splits (as
added tokens they are matched only where a text holds them literally, "▁" included). The chat
template is the format this package's chat_completion uses for the vocabulary (llama/formats.py):
the 70B turns with <step> when it has that piece, else Llama-2's [INST]; rendered by transformers'
apply_chat_template and encoded by tokenizer.json, it gives the ids of chat_prompt_tokens.
generation_config.json's eos_token_id lists every id that ends an answer here: EOS, and <EOT> (the
end of an infilled middle) and <step> (the end of a 70B turn) where the vocabulary has them.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as Backend

from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, STEP_PIECE, SUFFIX_PIECE, Tokenizer

NORMAL, USER_DEFINED = 1, 4  # sentencepiece piece types
INFILLING_PIECES = (PREFIX_PIECE, MIDDLE_PIECE, SUFFIX_PIECE, EOT_PIECE)
FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Code with the whitespace that matters to a sentencepiece vocabulary, and text beyond ASCII.
SAMPLE = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "    indented by four", "  two leading spaces", " one", "\tcontinue\n\t\treturn", "\n\n\nx", "trailing   ",
    "a  b   c    d", " ", "", "\n", "class Stack:\r\n    pass", "print(\"naïve café ü ß\")  # ½ → ∑",
    "字符串 = '你好'",
    "emoji = '🦙🔥'", "x = [1, 2, 3]; y = {k: v for k, v in z.items()}", "<PRE> <SUF> <MID> [INST] <<SYS>>",
]

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = none %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
STEP_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ ' Source: system<step>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ ' Source: ' + message['role'] | trim }}"
    "{% if message['destination'] is defined and message['destination'] is not none %}"
    "{{ '\\nDestination: ' + message['destination'] | trim }}{% endif %}"
    "{% if message['content'] %}{{ ' \\n\\n ' + message['content'] | trim }}{% endif %}"
    "{{ '<step>' }}"
    "{% endfor %}"
    "{{ ' Source: assistant\\nDestination: user \\n\\n ' }}"
)


def build_backend(model_path: Path) -> Backend:
    """tokenizer.json's tokenizer for the sentencepiece BPE model at `model_path` (see the module
    docstring), with <s> first in every encoded text."""
    proto = sp_pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != sp_pb.TrainerSpec.BPE:
        raise ValueError(f"{model_path} is a sentencepiece {sp_pb.TrainerSpec.ModelType.Name(spec.model_type)} model; "
                         "only BPE models (Llama's) are converted to tokenizer.json")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise ValueError(f"{model_path} normalizes text ({norm.name!r}) unlike Llama's tokenizers; it is not converted "
                         "to tokenizer.json")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk_piece or "<unk>", fuse_unk=True,
                                 byte_fallback=spec.byte_fallback, dropout=None))
    prefix = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    bos = proto.pieces[spec.bos_id].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)])
    specials = [proto.pieces[i].piece for i in (spec.unk_id, spec.bos_id, spec.eos_id) if 0 <= i < len(proto.pieces)]
    specials += [p for p in INFILLING_PIECES + (STEP_PIECE,) if p in vocab]
    backend.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]  # sentencepiece keeps them whole
    backend.add_tokens([AddedToken(p, normalized=True, special=False) for p in user])
    return backend


def check_same_ids(backend: Backend, tokenizer: Tokenizer, where: Path) -> None:
    """Raise unless `backend` encodes the sample and the text of every piece as sentencepiece does."""
    special = [t.content for t in backend.get_added_tokens_decoder().values()]
    pieces = [tokenizer.token_piece(i).replace("▁", " ") for i in range(tokenizer.n_words)]
    texts = SAMPLE + [t for t in pieces if not any(s in t for s in special)]  # "<s>" in a text is BOS there
    got = [e.ids for e in backend.encode_batch(texts)]
    for text, ids in zip(texts, got):
        want = tokenizer.encode(text, bos=True, eos=False)
        if ids != want:
            raise ValueError(
                f"the tokenizer.json built from {where} encodes {text!r} as {ids[:12]} where sentencepiece gives "
                f"{want[:12]}: this vocabulary cannot be converted faithfully, so no tokenizer files were written"
            )


def chat_template(tokenizer: Tokenizer) -> str:
    """The chat format this package uses for the vocabulary, as a Jinja template (llama/formats.py)."""
    return STEP_CHAT_TEMPLATE if tokenizer.step_id is not None else LLAMA2_CHAT_TEMPLATE


def stop_ids(tokenizer: Tokenizer) -> List[int]:
    """EOS, and the ids that end an infilled middle (<EOT>) or a 70B turn (<step>) where they exist."""
    return [i for i in (tokenizer.eos_id, tokenizer.eot_id, tokenizer.step_id) if i is not None]


def tokenizer_files(model_path: Path, model_max_length: int) -> Dict[str, dict]:
    """{file name: content} of the Hugging Face tokenizer files for the sentencepiece model at
    `model_path`, checked against sentencepiece (see the module docstring)."""
    tokenizer = Tokenizer(str(model_path))
    backend = build_backend(model_path)
    check_same_ids(backend, tokenizer, model_path)
    piece = tokenizer.token_piece
    extra = [p for p in INFILLING_PIECES + (STEP_PIECE,) if backend.token_to_id(p) is not None]
    decoder = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(backend.get_added_tokens_decoder().items())
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.sp_model.unk_id()),
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,  # the dummy prefix is put before every text between special tokens
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "additional_special_tokens": extra,
        "added_tokens_decoder": decoder,
        "chat_template": chat_template(tokenizer),
    }
    if all(p in extra for p in INFILLING_PIECES):
        config.update(prefix_token=PREFIX_PIECE, middle_token=MIDDLE_PIECE, suffix_token=SUFFIX_PIECE,
                      eot_token=EOT_PIECE)
    eos = stop_ids(tokenizer)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    return {"tokenizer.json": json.loads(backend.to_str()), "tokenizer_config.json": config,
            "generation_config.json": generation}


def write_json(path: Path, content: dict) -> None:
    """`content` as indented JSON, non-ASCII text (the "▁" of pieces) as it is."""
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> Optional[List[Path]]:
    """Hugging Face tokenizer files `src_dir` already has (a Hugging Face checkpoint without
    tokenizer.model), copied; None if it has none."""
    names = [n for n in FILES + ("special_tokens_map.json", "chat_template.jinja") if (src_dir / n).is_file()]
    for name in names:
        (dst_dir / name).write_bytes((src_dir / name).read_bytes())
    return [dst_dir / n for n in names] or None
