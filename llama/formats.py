"""Prompt formats: pure functions from text to token lists.

These formats are facts about how the models were trained; every token must match. Code Llama's
are built in (completion, infilling, the Llama-2 [INST] chat and the 70B <step> turns); a model
whose tokenizer carries a chat template (a GGUF's or tokenizer.json's) chats in that template,
rendered as transformers renders it.
"""

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, List, Literal, Sequence, TypedDict

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama.tokenizer import TokenizerProtocol

Role = Literal["system", "user", "assistant"]


class _MessageFields(TypedDict):
    role: Role
    content: str


class Message(_MessageFields, total=False):
    destination: str  # 70B turn format only: whom the message is addressed to


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

ROLES = ("system", "user", "assistant")


def completion_prompt_tokens(tokenizer: TokenizerProtocol, prompt: str) -> List[int]:
    """BOS (if the model's prompts start with one: Code Llama's do) + the prompt."""
    return tokenizer.encode(prompt, bos=tokenizer.add_bos, eos=False)


def infilling_prompt_tokens(
    tokenizer: TokenizerProtocol, prefix: str, suffix: str, suffix_first: bool = False
) -> List[int]:
    """Fill-in-the-middle prompt; the model writes the middle and ends it with <EOT>.

    prefix-suffix-middle: "<PRE> {prefix} <SUF>{suffix} <MID>"
    suffix-prefix-middle (suffix_first): "<PRE> <SUF>{suffix} <MID> {prefix}"
    """
    if not tokenizer.has_infilling:
        raise ValueError(
            "this tokenizer has no infilling pieces (<PRE>, <SUF>, <MID>, <EOT>). Infilling works with "
            "CodeLlama-7b, CodeLlama-13b and their -Instruct variants, not with the -Python variants, "
            "the 34B or the 70B models."
        )
    pre = tokenizer.encode(prefix, bos=False, eos=False)
    suf = tokenizer.encode_infilling(suffix)
    bos, p, s, m = tokenizer.bos_id, tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id
    if suffix_first:
        return [bos, p, s] + suf + [m] + pre
    return [bos, p] + pre + [s] + suf + [m]


def check_dialog(dialog: Dialog, index: int = 0) -> None:
    """Raise if `dialog` is not an optional system message, then user and assistant messages
    alternating, ending with a user message."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)):
        raise TypeError(f"{where} must be a list of messages, not {type(dialog).__name__}")
    if not dialog:
        raise ValueError(f"{where} is empty: a dialog needs at least one user message")
    for j, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise TypeError(f"{where}, message {j}: expected a dict with 'role' and 'content', got {msg!r}")
        if msg["role"] not in ROLES:
            raise ValueError(
                f"{where}, message {j}: unknown role {msg['role']!r}; roles are 'system', 'user', 'assistant'"
            )
        if not isinstance(msg.get("content"), str):
            raise TypeError(f"{where}, message {j}: 'content' must be a str, got {msg.get('content')!r}")
        destination = msg.get("destination")
        if destination is not None and not isinstance(destination, str):
            raise TypeError(f"{where}, message {j}: 'destination' must be a str, got {destination!r}")
    start = 1 if dialog[0]["role"] == "system" else 0
    for j in range(start, len(dialog)):
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if dialog[j]["role"] != expected:
            raise ValueError(
                f"{where}, message {j} is from {dialog[j]['role']!r} but should be from {expected!r}: a dialog is "
                "an optional 'system' message, then 'user' and 'assistant' messages alternating, ending with 'user'"
            )
    if dialog[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be from 'user', got {dialog[-1]['role']!r}")


def has_special_tags(dialog: Dialog) -> bool:
    """True if any message smuggles in the format's own markers; such dialogs are not answered."""
    return any(tag in msg["content"] for msg in dialog for tag in SPECIAL_TAGS)


def refuses_dialog(tokenizer: TokenizerProtocol, dialog: Dialog) -> bool:
    """True if a Code Llama chat format would refuse `dialog` (UNSAFE_ERROR, as the reference does):
    it smuggles in [INST], <<SYS>> or <step>. A model's own chat template takes the messages as
    given, as transformers does."""
    return tokenizer.chat_template is None and has_special_tags(dialog)


def llama2_dialog_prompt_tokens(tokenizer: TokenizerProtocol, dialog: Dialog) -> List[int]:
    """Llama-2 instruct format:
    BOS [INST] {user} [/INST] {answer} EOS ... BOS [INST] {last user} [/INST]
    A system message is folded into the first user message between <<SYS>> markers."""
    check_dialog(dialog)
    if dialog[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    tokens: List[int] = []
    for user, answer in zip(dialog[:-1:2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def dialog_prompt_tokens(tokenizer: TokenizerProtocol, dialog: Dialog) -> List[int]:
    """70B turn format (tokenizers with a <step> piece), for the messages exactly as given. Each
    message is " Source: {role}[\\nDestination: {destination}]", then "\\n\\n {content}" if any,
    then <step>; the reply starts with " Source: assistant\\nDestination: user" and "\\n\\n ".
    (chat_prompt_tokens puts an empty system message first when the dialog has none.)"""
    if tokenizer.step_id is None:
        raise ValueError("the 70B dialog format needs a tokenizer with the <step> piece (CodeLlama-70b-Instruct)")
    check_dialog(dialog)
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        header = f" Source: {msg['role'].strip()}"
        if msg.get("destination") is not None:
            header += f"\nDestination: {msg['destination'].strip()}"
        tokens += tokenizer.encode(header, bos=False, eos=False)
        if msg["content"]:
            tokens += tokenizer.encode("\n\n " + msg["content"].strip(), bos=False, eos=False)
        tokens.append(tokenizer.step_id)
    tokens += tokenizer.encode(" Source: assistant\nDestination: user", bos=False, eos=False)
    tokens += tokenizer.encode("\n\n ", bos=False, eos=False)
    return tokens


def template_variables(tokenizer: TokenizerProtocol) -> Dict[str, str]:
    """The special tokens a chat template may write, by the names transformers gives them."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    return {name: tokenizer.token_piece(i) for name, i in ids.items() if i is not None and i >= 0}


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it: sandboxed, trim_blocks and lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(
            f"the model's chat template is not valid Jinja ({e}); fix or replace the checkpoint's template"
        ) from None


def render_chat_template(template: str, dialog: Dialog, **variables: Any) -> str:
    """The text of `dialog` in `template`, with the assistant's turn opened (add_generation_prompt)."""
    messages = [dict(msg) for msg in dialog]
    try:
        return compile_chat_template(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True, **variables
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the model's chat template refused the dialog: {e}") from None


def template_dialog_prompt_tokens(tokenizer: TokenizerProtocol, dialog: Dialog) -> List[int]:
    """The dialog rendered in the tokenizer's chat template, encoded as is: the template writes BOS
    if the model wants one, and the special tokens it writes (<|im_start|>) become their ids."""
    check_dialog(dialog)
    text = render_chat_template(tokenizer.chat_template, dialog, **template_variables(tokenizer))
    return tokenizer.encode(text, bos=False, eos=False)


def chat_prompt_tokens(tokenizer: TokenizerProtocol, dialog: Dialog) -> List[int]:
    """The dialog in the format of the model that `tokenizer` belongs to: its chat template if it
    carries one (Code Llama's sentencepiece tokenizers carry none), else the 70B format if it has a
    <step> piece, else Llama-2's [INST] format. The 70B format starts with a system message: an
    empty one is put first if the dialog has none."""
    if tokenizer.chat_template is not None:
        return template_dialog_prompt_tokens(tokenizer, dialog)
    if tokenizer.step_id is not None:
        check_dialog(dialog)
        if dialog[0]["role"] != "system":
            dialog = [{"role": "system", "content": ""}] + list(dialog)
        return dialog_prompt_tokens(tokenizer, dialog)
    return llama2_dialog_prompt_tokens(tokenizer, dialog)


def chat_stop_ids(tokenizer: TokenizerProtocol) -> List[int]:
    """Tokens that end an assistant answer: EOS in every format; also <step> in the 70B format, and
    the end-of-turn token (<|im_end|>) in a chat template."""
    if tokenizer.chat_template is not None and tokenizer.eot_id not in (None, tokenizer.eos_id):
        return [tokenizer.eot_id, tokenizer.eos_id]
    return [tokenizer.step_id, tokenizer.eos_id] if tokenizer.step_id is not None else [tokenizer.eos_id]


def infilling_stop_ids(tokenizer: TokenizerProtocol) -> List[int]:
    """Tokens that end an infilled middle: <EOT>, and EOS should the model ever emit it."""
    return [tokenizer.eot_id, tokenizer.eos_id]


def check_texts(texts: Sequence[str], name: str) -> None:
    """Raise unless `texts` is a list of str (a lone str is a common mistake)."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not a single string; wrap it: [{name[:-1]}]")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, not {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, not {type(t).__name__}")
