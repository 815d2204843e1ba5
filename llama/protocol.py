"""The HTTP APIs the server speaks: OpenAI's completions and chat completions, and llama.cpp's
/infill. Requests are checked and turned into `Job`s (prompt tokens and settings); results are
shaped back into each API's JSON. No I/O here, so every format can be tested on its own.
"""

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from llama.answers import Result
from llama.checks import is_int
from llama.formats import (
    UNSAFE_ERROR,
    chat_prompt_tokens,
    check_dialog,
    completion_prompt_tokens,
    refuses_dialog,
    infilling_prompt_tokens,
)
from llama.sampling import SamplingParams, check_temperature, check_top_p
from llama.tokenizer import TokenizerProtocol


class APIError(Exception):
    """A request the server refuses, with the HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request, ready for the model."""

    api: str  # "completions", "chat" or "infill": the shape of the answer
    prompt_tokens: List[int]
    params: SamplingParams  # max_gen_len: new tokens at most (cut further by max_seq_len)
    stop: List[str] = field(default_factory=list)  # stop strings: the text ends before the first
    stream: bool = False
    echo_text: str = ""  # text put before the answer (OpenAI echo)
    infill: bool = False  # decode the answer as an infilled middle
    fixed_answer: Optional[str] = None  # answered without the model (refused chat, n_predict=0)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# Reading the body ------------------------------------------------------------------------------

MAX_DEPTH = 64  # nesting of objects and lists a request may have
MAX_STOP_STRINGS = 16  # OpenAI allows 4; clients send a handful
MAX_STOP_LENGTH = 256  # characters per stop string


def parse_json_body(raw: bytes) -> Any:
    """The request's JSON, refused (400) unless it is valid JSON of at most MAX_DEPTH levels whose
    strings are all valid Unicode (JSON can carry lone UTF-16 surrogates such as "\\ud800")."""
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        body = None
        _too_deep()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            _too_deep()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            child = (f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]").lstrip(".")
            if isinstance(key, str):
                _check_text(key, child)
            stack.append((item, child, depth + 1))
    return body


def _too_deep():
    raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        path = path.encode("utf-8", "backslashreplace").decode()  # the path itself may hold the surrogate
        top = re.split(r"[.\[]", path, maxsplit=1)[0] or None
        raise APIError(400, f"'{path}' holds an unpaired UTF-16 surrogate (such as \\ud800), which is not "
                            "text; send valid Unicode", param=top) from None


# Checking fields -------------------------------------------------------------------------------


def _get(body: dict, name: str, kinds, default=None, check=None, why: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in _tuple(kinds):
        raise APIError(400, f"'{name}' must be {why or _describe(kinds)}, got {value!r}", param=name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' must be {why}, got {value!r}", param=name)
    return value


def _tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _describe(kinds) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "an object"}[k] for k in _tuple(kinds))


def _sampling(body: dict, temperature: float, top_p: float, max_gen_len: int, logprobs: bool = False) -> SamplingParams:
    """The request's sampling settings, with this API's defaults, checked by llama.sampling's rules."""
    checked = {}
    for name, check, default in (("temperature", check_temperature, temperature), ("top_p", check_top_p, top_p)):
        value = body.get(name)
        try:
            checked[name] = float(default if value is None else check(value))
        except ValueError as e:
            raise APIError(400, f"'{name}' {str(e).split(' ', 1)[1]}", param=name) from None
    return SamplingParams(checked["temperature"], checked["top_p"], max_gen_len, logprobs)


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of strings, got {stop!r}"[:300], param="stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise APIError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} "
                            "characters each", param="stop")
    return [s for s in stop if s]


def _n(body: dict) -> None:
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n")


def _prompt_room(tokens: List[int], max_seq_len: int, param: str) -> None:
    if len(tokens) >= max_seq_len:
        raise APIError(
            400, f"the prompt is {len(tokens)} tokens long, but this server's context is {max_seq_len} tokens "
                 "(prompt and answer together); shorten the prompt or start the server with a larger --max_seq_len",
            param=param, code="context_length_exceeded",
        )


# Fill-in-the-middle prompts built by clients ------------------------------------------------------

_MARKERS = re.compile(r"^(?:<s>)?\s*<PRE> ?(.*?) ?<SUF>(.*?) ?<MID> ?(.*)$", re.DOTALL)


def split_fim_prompt(prompt: str):
    """(prefix, suffix, suffix_first) of a prompt that a client built with Code Llama's markers,
    "<PRE> {prefix} <SUF>{suffix} <MID>" or "<PRE> <SUF>{suffix} <MID> {prefix}"; None otherwise.
    Each marker owns one space, as the special pieces do."""
    m = _MARKERS.match(prompt)
    if not m:
        return None
    before, suffix, after = m.groups()
    if after and not before:
        return after, suffix, True
    if after:  # text after <MID> in prefix-suffix-middle order: the start of the middle
        return None
    return before, suffix, False


def _infill_tokens(tokenizer: TokenizerProtocol, prefix: str, suffix: str, suffix_first: bool = False) -> List[int]:
    if not tokenizer.has_infilling:
        raise APIError(400, "this model cannot fill in the middle (its tokenizer has no <PRE>, <SUF>, <MID>, <EOT> "
                            "pieces): use CodeLlama-7b or -13b or their -Instruct variants", param="suffix")
    return infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=suffix_first)


# Requests -----------------------------------------------------------------------------------------


def parse_completion(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int) -> Job:
    """POST /v1/completions: a completion, or fill-in-the-middle with `suffix` or with the markers."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
    suffix = _get(body, "suffix", str)
    logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
    max_tokens = _get(body, "max_tokens", int, 16, lambda v: v >= 0, "an integer >= 0")
    job = Job(
        api="completions", prompt_tokens=[], params=_sampling(body, 1.0, 1.0, max_tokens, logprobs is not None),
        stop=_stop(body), stream=_get(body, "stream", bool, False),
        echo_text=prompt if _get(body, "echo", bool, False) else "",
    )
    fim = (prompt, suffix, False) if suffix is not None else split_fim_prompt(prompt) if tokenizer.has_infilling else None
    if fim is not None:
        job.prompt_tokens, job.infill = _infill_tokens(tokenizer, *fim), True
    else:
        job.prompt_tokens = completion_prompt_tokens(tokenizer, prompt)
    _prompt_room(job.prompt_tokens, max_seq_len, "prompt")
    return job


def _message_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_chat(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int) -> Job:
    """POST /v1/chat/completions: the dialog in the model's chat format."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _n(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    dialog = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        msg = {"role": m.get("role"), "content": _message_text(m.get("content"), i)}
        if isinstance(m.get("destination"), str):
            msg["destination"] = m["destination"]
        dialog.append(msg)
    try:
        check_dialog(dialog)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e).replace("dialog 0", "messages"), param="messages") from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 0):
        raise APIError(400, f"'max_tokens' must be an integer >= 0, got {max_tokens!r}", param="max_tokens")
    logprobs = _get(body, "logprobs", bool, False)
    try:
        prompt_tokens = chat_prompt_tokens(tokenizer, dialog)
    except ValueError as e:  # the model's chat template refused the dialog
        raise APIError(400, str(e), param="messages") from None
    job = Job(
        api="chat", prompt_tokens=prompt_tokens,
        params=_sampling(body, 1.0, 1.0, max_seq_len if max_tokens is None else max_tokens, logprobs),
        stop=_stop(body), stream=_get(body, "stream", bool, False),
    )
    if refuses_dialog(tokenizer, dialog):
        job.fixed_answer = UNSAFE_ERROR
    _prompt_room(job.prompt_tokens, max_seq_len, "messages")
    return job


def parse_infill(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int) -> Job:
    """POST /infill (llama.cpp): input_prefix, input_suffix, input_extra chunks before the prefix,
    and `prompt`, the start of the middle."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    prefix = _get(body, "input_prefix", str, "")
    suffix = _get(body, "input_suffix", str, "")
    extra = _get(body, "input_extra", list, [])
    chunks = []
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text", ""), str):
            raise APIError(400, f"input_extra[{i}] must be an object with a 'text' string", param="input_extra")
        text = chunk.get("text", "")
        chunks.append(text if text.endswith("\n") or not text else text + "\n")
    middle = _get(body, "prompt", str, "")
    n_predict = _get(body, "n_predict", int, -1, lambda v: v >= -1, "an integer >= -1 (-1: no limit)")
    params = _sampling(body, 0.8, 0.95, max_seq_len if n_predict < 0 else n_predict)
    tokens = _infill_tokens(tokenizer, "".join(chunks) + prefix, suffix)
    if middle:
        tokens += tokenizer.encode_infilling(middle)
    job = Job(
        api="infill", prompt_tokens=tokens, params=params, stop=_stop(body),
        stream=_get(body, "stream", bool, False), infill=True,
    )
    if n_predict == 0:
        job.fixed_answer = ""
    _prompt_room(tokens, max_seq_len, "input_prefix")
    return job


# Responses ----------------------------------------------------------------------------------------


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def _completion_logprobs(job: Job, r: Result) -> Optional[dict]:
    if not job.params.logprobs:
        return None
    offset = len(job.echo_text)
    return {"tokens": r.tokens, "token_logprobs": r.logprobs, "top_logprobs": None,
            "text_offset": [offset + o for o in r.offsets]}


def completion_response(job: Job, r: Result, model: str) -> dict:
    if job.api == "infill":
        return {"content": r.text, "stop": True, "stop_type": r.stop_type, "stopping_word": r.stopping_word,
                "model": model, "tokens_predicted": r.completion_tokens, "tokens_evaluated": r.prompt_tokens}
    if job.api == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                  "logprobs": _chat_logprobs(job, r)}
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": model,
                "choices": [choice], "usage": _usage(r)}
    choice = {"text": job.echo_text + r.text, "index": 0, "logprobs": _completion_logprobs(job, r),
              "finish_reason": r.finish_reason}
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
            "choices": [choice], "usage": _usage(r)}


def _chat_logprobs(job: Job, r: Result) -> Optional[dict]:
    if not job.params.logprobs:
        return None
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(r.tokens, r.logprobs)]}


def stream_chunk(job: Job, model: str, text: str, finish: Optional[Result] = None, first: bool = False) -> dict:
    """One server-sent event's data: new text, and on the last one how the answer ended."""
    reason = finish.finish_reason if finish else None
    if job.api == "infill":
        chunk: Dict[str, Any] = {"content": text, "stop": finish is not None}
        if finish:
            chunk.update(completion_response(job, finish, model), content=text)
        return chunk
    if job.api == "chat":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
    chunk = {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
             "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}
    if finish:
        chunk["usage"] = _usage(finish)
    return chunk
