"""The HTTP APIs the server speaks: OpenAI's completions and chat completions, and llama.cpp's
/completion, /infill, /tokenize and /detokenize. Request bodies are checked by the pydantic models
of llama.schemas and turned into a `Request`: one `Job` (prompt tokens and settings, one batch
row) per choice; results are shaped back into each API's JSON. No I/O here, so every format can
be tested on its own.
"""

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

from pydantic import ValidationError

from llama.answers import Result
from llama.formats import (
    UNSAFE_ERROR,
    chat_prompt_tokens,
    check_dialog,
    completion_prompt_tokens,
    refuses_dialog,
    infilling_prompt_tokens,
)
from llama.sampling import SamplingParams
from llama.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    InfillRequest,
    LlamaCppCompletionRequest,
    LlamaCppSampling,
    Sampling,
    TokenizeRequest,
    validation_error,
)
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
    """One choice of a request (one batch row), ready for the model."""

    api: str  # "completions", "chat", "infill" or "completion" (llama.cpp): the shape of the answer
    prompt_tokens: List[int]
    params: SamplingParams  # max_gen_len: new tokens at most (cut further by max_seq_len)
    stop: List[str] = field(default_factory=list)  # stop strings: the text ends before the first
    stream: bool = False
    echo_text: str = ""  # text put before the answer (OpenAI echo)
    infill: bool = False  # decode the answer as an infilled middle
    fixed_answer: Optional[str] = None  # answered without the model (refused chat, n_predict=0)
    n: int = 1  # choices of its prompt (the request's n)
    index: int = 0  # the choice's index in the answer (OpenAI: prompt index * n + choice)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])  # the request's id (logs, X-Request-Id)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Request:
    """A checked request: its jobs, one per choice, in the answer's index order."""

    api: str
    jobs: List[Job]
    stream: bool = False
    include_usage: bool = False  # streams end with a usage chunk (stream_options.include_usage)
    keep: int = 0  # best_of: each prompt's jobs are candidates, of which this many best are answered
    show_logprobs: bool = True  # False: candidates made log-probabilities only to be ranked
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, results: List[Result]) -> dict:
        """OpenAI's usage: each prompt counted once (its n choices share it), every answer's tokens."""
        prompt = sum(r.prompt_tokens for j, r in zip(self.jobs, results) if j.index % j.n == 0)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# Reading the body ------------------------------------------------------------------------------

MAX_DEPTH = 64  # nesting of objects and lists a request may have
MAX_CHOICES = 64  # prompts times n in one request


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


def validate(model: type, body: Any) -> Any:
    """`body` as a `model` (llama.schemas), or the APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_error(e)
        if param == "prompt" and model in (CompletionRequest, LlamaCppCompletionRequest):
            kinds = "a string or a list of token ids" if model is LlamaCppCompletionRequest else \
                "a string, a list of token ids, or a list of strings or token-id lists"
            message = f"'prompt' must be {kinds}, got {body.get('prompt')!r}"[:300]
        raise APIError(400, message, param=param) from None


def check_model(requested: Optional[str], served: List[str]) -> None:
    """A 404 (OpenAI's model_not_found) unless `requested` is None or one of the `served` names
    (the server's --served_model_name, by default the checkpoint's folder name and ckpt_dir as given)."""
    if requested is None or requested in served:
        return
    raise APIError(404, f"The model '{requested}' does not exist; this server serves {', '.join(served)} "
                        "(GET /v1/models)", param="model", code="model_not_found")


def sampling_params(req: Sampling, temperature: float, top_p: float, max_gen_len: int, logprobs: bool = False,
                    top_logprobs: int = 0, logit_bias: Optional[dict] = None, vocab: int = 0,
                    repetition_penalty: Optional[float] = None, seed: Optional[int] = None) -> SamplingParams:
    """The request's SamplingParams, with this API's defaults for what it did not send."""
    bias = tuple(sorted((int(k), float(v)) for k, v in (logit_bias or {}).items()))
    for token, _ in bias:
        if token >= vocab:
            raise APIError(400, f"'logit_bias' names token {token}, outside this model's vocabulary of {vocab} "
                                "tokens", param="logit_bias")
    try:
        return SamplingParams(
            float(temperature if req.temperature is None else req.temperature),
            float(top_p if req.top_p is None else req.top_p), max_gen_len, logprobs or top_logprobs > 0,
            top_logprobs=top_logprobs, seed=seed, top_k=max(0, req.top_k or 0), min_p=float(req.min_p or 0),
            presence_penalty=float(req.presence_penalty or 0), frequency_penalty=float(req.frequency_penalty or 0),
            repetition_penalty=float(repetition_penalty or 1), logit_bias=bias,
        )
    except ValueError as e:  # the schemas check first; this is the last line, never a 500
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def choice_seed(seed: Optional[int], index: int) -> Optional[int]:
    """The seed of choice `index` of a seeded request: the request's own for the first, spread
    apart for the others (so n choices differ, and each is the same on every call)."""
    if seed is None:
        return None
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64


def _stop(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    return [s for s in stops if s]


def _prompt_room(tokens: List[int], max_seq_len: int, param: str) -> None:
    if len(tokens) >= max_seq_len:
        raise APIError(
            400, f"the prompt is {len(tokens)} tokens long, but this server's context is {max_seq_len} tokens "
                 "(prompt and answer together); shorten the prompt or start the server with a larger --max_seq_len",
            param=param, code="context_length_exceeded",
        )


def check_token_ids(tokens: List[int], vocab: int, param: str) -> List[int]:
    """`tokens` if it is a non-empty list of ids in the vocabulary; otherwise a 400 naming `param`."""
    if not tokens:
        raise APIError(400, f"'{param}' holds an empty list of token ids; send at least one token", param=param)
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"'{param}' holds token id {bad[0]}, outside this model's vocabulary of {vocab} tokens "
                            f"(0 to {vocab - 1})", param=param)
    return tokens


def _openai_common(req, prompts: int) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    rows = max(req.n, getattr(req, "best_of", None) or 0) * prompts
    if rows > MAX_CHOICES:
        raise APIError(400, f"this request asks for {rows} choices (prompts times n or best_of); at most "
                            f"{MAX_CHOICES} per request", param="n")


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


def parse_completion(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int, served: List[str] = ()) -> Request:
    """POST /v1/completions: completions of one prompt or of several (text or token ids), n each,
    or fill-in-the-middle with `suffix` or with the markers."""
    req = validate(CompletionRequest, body)
    if served:
        check_model(req.model, list(served))
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    _openai_common(req, len(prompts))
    best = req.best_of or req.n
    if best < req.n:
        raise APIError(400, f"'best_of' ({best}) must be at least n ({req.n})", param="best_of")
    if best > req.n and req.stream:
        raise APIError(400, "'best_of' larger than n cannot be streamed (as OpenAI); ask without stream",
                       param="best_of")
    if req.suffix is not None and (len(prompts) > 1 or not isinstance(prompts[0], str)):
        raise APIError(400, "'suffix' takes one text prompt, not a list or token ids", param="suffix")
    out = Request("completions", [], req.stream, bool(req.stream_options and req.stream_options.include_usage),
                  keep=req.n if best > req.n else 0, show_logprobs=req.logprobs is not None)
    stops, vocab = _stop(req.stop), tokenizer.n_words
    for p, prompt in enumerate(prompts):
        infill, echo = False, prompt
        if isinstance(prompt, list):
            tokens = check_token_ids(prompt, vocab, "prompt")
            echo = tokenizer.decode(tokens) if req.echo else ""
        else:
            fim = (prompt, req.suffix, False) if req.suffix is not None else \
                split_fim_prompt(prompt) if tokenizer.has_infilling else None
            if fim is not None:
                tokens, infill = _infill_tokens(tokenizer, *fim), True
            else:
                tokens = completion_prompt_tokens(tokenizer, prompt)
        _prompt_room(tokens, max_seq_len, "prompt")
        for c in range(best):  # best_of > n: candidates, ranked by their log-probabilities
            params = sampling_params(req, 1.0, 1.0, req.max_tokens, req.logprobs is not None or best > req.n,
                                     req.logprobs or 0, req.logit_bias, vocab, req.repetition_penalty,
                                     choice_seed(req.seed, c))
            out.jobs.append(Job("completions", tokens, params, stops, req.stream, echo if req.echo else "", infill,
                                index=p * best + c, id=out.id, n=best))
    return out


def _message_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_chat(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int, served: List[str] = ()) -> Request:
    """POST /v1/chat/completions: the dialog in the model's chat format, n answers."""
    req = validate(ChatRequest, body)
    if served:
        check_model(req.model, list(served))
    _openai_common(req, 1)
    messages = req.messages
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
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:
        prompt_tokens = chat_prompt_tokens(tokenizer, dialog)
    except ValueError as e:  # the model's chat template refused the dialog
        raise APIError(400, str(e), param="messages") from None
    out = Request("chat", [], req.stream, bool(req.stream_options and req.stream_options.include_usage))
    refused = refuses_dialog(tokenizer, dialog)
    _prompt_room(prompt_tokens, max_seq_len, "messages")
    for c in range(req.n):
        params = sampling_params(req, 1.0, 1.0, max_seq_len if max_tokens is None else max_tokens, req.logprobs,
                                 req.top_logprobs or 0, req.logit_bias, tokenizer.n_words, req.repetition_penalty,
                                 choice_seed(req.seed, c))
        job = Job("chat", prompt_tokens, params, _stop(req.stop), req.stream, index=c, id=out.id, n=req.n)
        if refused:
            job.fixed_answer = UNSAFE_ERROR
        out.jobs.append(job)
    return out


def _llama_cpp_params(req: LlamaCppSampling, tokenizer: TokenizerProtocol, max_seq_len: int) -> SamplingParams:
    if req.repeat_penalty is not None and req.repetition_penalty is not None:
        raise APIError(400, "send 'repeat_penalty' or 'repetition_penalty', not both", param="repeat_penalty")
    seed = None if req.seed is None or req.seed == -1 else choice_seed(req.seed, 0)  # llama.cpp: -1 is random
    return sampling_params(req, 0.8, 0.95, max_seq_len if req.n_predict < 0 else req.n_predict, req.n_probs > 0,
                           req.n_probs, None, tokenizer.n_words, req.repeat_penalty or req.repetition_penalty, seed)


def parse_infill(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int, served: List[str] = ()) -> Request:
    """POST /infill (llama.cpp): input_prefix, input_suffix, input_extra chunks before the prefix,
    and `prompt`, the start of the middle."""
    req = validate(InfillRequest, body)
    if served:
        check_model(req.model, list(served))
    chunks = []
    for i, chunk in enumerate(req.input_extra):
        if not isinstance(chunk.get("text", ""), str):
            raise APIError(400, f"input_extra[{i}] must be an object with a 'text' string", param="input_extra")
        text = chunk.get("text", "")
        chunks.append(text if text.endswith("\n") or not text else text + "\n")
    params = _llama_cpp_params(req, tokenizer, max_seq_len)
    tokens = _infill_tokens(tokenizer, "".join(chunks) + req.input_prefix, req.input_suffix)
    if req.prompt:
        tokens += tokenizer.encode_infilling(req.prompt)
    job = Job(api="infill", prompt_tokens=tokens, params=params, stop=_stop(req.stop), stream=req.stream, infill=True)
    if req.n_predict == 0:
        job.fixed_answer = ""
    _prompt_room(tokens, max_seq_len, "input_prefix")
    return Request("infill", [job], req.stream, id=job.id)


def parse_llama_completion(body: Any, tokenizer: TokenizerProtocol, max_seq_len: int,
                           served: List[str] = ()) -> Request:
    """POST /completion (llama.cpp): a prompt as text (BOS added as the model wants) or token ids."""
    req = validate(LlamaCppCompletionRequest, body)
    if served:
        check_model(req.model, list(served))
    if isinstance(req.prompt, list):
        tokens = check_token_ids(req.prompt, tokenizer.n_words, "prompt")
    else:
        tokens = completion_prompt_tokens(tokenizer, req.prompt)
    _prompt_room(tokens, max_seq_len, "prompt")
    job = Job(api="completion", prompt_tokens=tokens, params=_llama_cpp_params(req, tokenizer, max_seq_len),
              stop=_stop(req.stop), stream=req.stream)
    if req.n_predict == 0:
        job.fixed_answer = ""
    return Request("completion", [job], req.stream, id=job.id)


def tokenize(body: Any, tokenizer: TokenizerProtocol) -> dict:
    """POST /tokenize (llama.cpp): {"tokens": [ids]}, or [{"id", "piece"}] with with_pieces."""
    req = validate(TokenizeRequest, body)
    tokens = tokenizer.encode(req.content, bos=req.add_special and tokenizer.bos_id is not None, eos=False)
    if req.with_pieces:
        return {"tokens": [{"id": t, "piece": tokenizer.decode([t])} for t in tokens]}
    return {"tokens": tokens}


def detokenize(body: Any, tokenizer: TokenizerProtocol) -> dict:
    """POST /detokenize (llama.cpp): {"content": the text of the tokens}."""
    req = validate(DetokenizeRequest, body)
    if req.tokens:
        check_token_ids(req.tokens, tokenizer.n_words, "tokens")
    return {"content": tokenizer.decode(req.tokens)}


# Responses ----------------------------------------------------------------------------------------


def _completion_logprobs(job: Job, r: Result) -> Optional[dict]:
    if not job.params.logprobs:
        return None
    offset = len(job.echo_text)
    top = [dict(alternatives) for alternatives in r.top_logprobs] if job.params.top_logprobs else None
    return {"tokens": r.tokens, "token_logprobs": r.logprobs, "top_logprobs": top,
            "text_offset": [offset + o for o in r.offsets]}


def _chat_logprobs(job: Job, r: Result) -> Optional[dict]:
    if not job.params.logprobs:
        return None
    tops = r.top_logprobs if job.params.top_logprobs else [[] for _ in r.tokens]
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())} for a, alp in top]}
                        for t, lp, top in zip(r.tokens, r.logprobs, tops)]}


def _llama_cpp_probs(job: Job, r: Result) -> List[dict]:
    """llama.cpp's completion_probabilities: per token its id, text, logprob and n_probs alternatives."""
    return [{"id": i, "token": t, "logprob": lp, "bytes": list(t.encode()),
             "top_logprobs": [{"id": ai, "token": a, "logprob": alp, "bytes": list(a.encode())}
                              for (a, alp), ai in zip(top, top_ids)]}
            for i, t, lp, top, top_ids in zip(r.token_ids, r.tokens, r.logprobs, r.top_logprobs, r.top_ids)]


def _llama_cpp_answer(job: Job, r: Result, model: str) -> dict:
    out = {"content": r.text, "stop": True, "stop_type": r.stop_type, "stopping_word": r.stopping_word,
           "model": model, "tokens_predicted": r.completion_tokens, "tokens_evaluated": r.prompt_tokens}
    if job.params.top_logprobs:
        out["completion_probabilities"] = _llama_cpp_probs(job, r)
    return out


def _choice(job: Job, r: Result) -> dict:
    if job.api == "chat":
        return {"index": job.index, "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason, "logprobs": _chat_logprobs(job, r)}
    return {"text": job.echo_text + r.text, "index": job.index, "logprobs": _completion_logprobs(job, r),
            "finish_reason": r.finish_reason}


def completion_response(request: Request, results: List[Result], model: str) -> dict:
    """The whole answer of a request, from each job's Result (in request.jobs' order)."""
    if request.api in ("infill", "completion"):
        return _llama_cpp_answer(request.jobs[0], results[0], model)
    kind = "chat.completion" if request.api == "chat" else "text_completion"
    prefix = "chatcmpl" if request.api == "chat" else "cmpl"
    chosen = _best(request, results) if request.keep else list(zip(request.jobs, results))
    choices = [_choice(j, r) for j, r in chosen]
    if not request.show_logprobs:
        for c in choices:
            c["logprobs"] = None
    return {"id": f"{prefix}-{request.id}", "object": kind, "created": request.created, "model": model,
            "choices": choices, "usage": request.usage(results)}


def _best(request: Request, results: List[Result]) -> List[tuple]:
    """best_of: of each prompt's candidates, the `keep` of the highest mean token log-probability
    (an empty answer ranks last), re-indexed as choices; ties keep the candidates' order."""
    best, chosen = request.jobs[0].n, []
    for start in range(0, len(request.jobs), best):
        group = list(zip(request.jobs[start : start + best], results[start : start + best]))
        group.sort(key=lambda jr: -sum(jr[1].logprobs) / len(jr[1].logprobs) if jr[1].logprobs else math.inf)
        for j, (job, r) in enumerate(group[: request.keep]):
            chosen.append((replace(job, index=start // best * request.keep + j), r))
    return chosen


def stream_chunk(request: Request, job: Job, model: str, text: str, finish: Optional[Result] = None,
                 first: bool = False) -> dict:
    """One server-sent event's data: new text of one choice, and on its last one how it ended
    (and, when asked, the log-probabilities of all its tokens)."""
    reason = finish.finish_reason if finish else None
    if job.api in ("infill", "completion"):
        chunk: Dict[str, Any] = {"content": text, "stop": finish is not None}
        if finish:
            chunk.update(_llama_cpp_answer(job, finish, model), content=text)
        return chunk
    if job.api == "chat":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"id": f"chatcmpl-{request.id}", "object": "chat.completion.chunk", "created": request.created,
                "model": model, "choices": [{"index": job.index, "delta": delta, "finish_reason": reason,
                                             "logprobs": _chat_logprobs(job, finish) if finish else None}]}
    chunk = {"id": f"cmpl-{request.id}", "object": "text_completion", "created": request.created, "model": model,
             "choices": [{"text": text, "index": job.index, "finish_reason": reason,
                          "logprobs": _completion_logprobs(job, finish) if finish else None}]}
    if finish and not request.include_usage and len(request.jobs) == 1:
        chunk["usage"] = request.usage([finish])  # this server's usage on the last chunk, as before
    return chunk


def usage_chunk(request: Request, results: List[Result], model: str) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    kind = "chat.completion.chunk" if request.api == "chat" else "text_completion"
    prefix = "chatcmpl" if request.api == "chat" else "cmpl"
    return {"id": f"{prefix}-{request.id}", "object": kind, "created": request.created, "model": model,
            "choices": [], "usage": request.usage(results)}
