"""The request bodies of the server's APIs as pydantic models: every field a client may send, its
type and range. A field not listed here is refused (400 naming it), never silently ignored.

OpenAI's /v1/completions and /v1/chat/completions, and llama.cpp's /completion, /infill,
/tokenize and /detokenize. Models only check shapes and ranges; llama.protocol turns them into
jobs and answers with the OpenAI error object, its message naming the field (`validation_error`).
"""

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llama.sampling import check_temperature, check_top_p

MAX_N = 16  # choices per prompt (OpenAI allows 128; each is a batch row)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_STOP_STRINGS = 16  # OpenAI allows 4; clients send a handful
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_LOGIT_BIAS = 300  # tokens a logit_bias may name (OpenAI's limit)


class Strict(BaseModel):
    """No coercion (a "5" is not 5, true is not 1), no unknown fields, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices


class Sampling(Strict):
    """The sampling fields shared by every generating endpoint (None: the endpoint's default)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, ge=-1)  # -1 or 0: all tokens (vLLM, llama.cpp)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        return v if v is None else check_temperature(v)

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        return v if v is None else check_top_p(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} "
                             "characters each")
        return v


class OpenAISampling(Sampling):
    """What OpenAI's two endpoints share."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[Dict[str, float]] = None  # token id (as a string) -> bias in [-100, 100]
    user: Optional[str] = None  # accepted and ignored, as it changes nothing in the answer

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"'logit_bias' may name at most {MAX_LOGIT_BIAS} tokens, got {len(v)}")
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"'logit_bias' keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"'logit_bias' values must be from -100 to 100, got {bias!r}")
        return v


class CompletionRequest(OpenAISampling):
    """POST /v1/completions."""

    prompt: Union[str, List[int], List[Union[str, List[int]]]]
    suffix: Optional[str] = None
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)  # candidates per prompt; the n best are answered


class ChatRequest(OpenAISampling):
    """POST /v1/chat/completions (messages are checked by llama.protocol, which names the message)."""

    messages: Any = None
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class LlamaCppSampling(Sampling):
    """llama.cpp's generating endpoints share these."""

    n_predict: int = Field(-1, ge=-1)  # -1: no limit
    n_probs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token in completion_probabilities
    repeat_penalty: Optional[float] = Field(None, gt=0)  # llama.cpp's name for repetition_penalty
    cache_prompt: bool = True  # accepted: reusing a prompt's cache changes nothing in the answer
    model: Optional[str] = None


class LlamaCppCompletionRequest(LlamaCppSampling):
    """POST /completion: a prompt as text or token ids."""

    prompt: Union[str, List[int]]


class InfillRequest(LlamaCppSampling):
    """POST /infill: the middle between input_prefix and input_suffix."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: List[Dict[str, Any]] = []
    prompt: str = ""  # the start of the middle


class TokenizeRequest(Strict):
    """POST /tokenize."""

    content: str
    add_special: bool = False  # begin with BOS
    with_pieces: bool = False  # [{"id", "piece"}] instead of ids


class DetokenizeRequest(Strict):
    """POST /detokenize."""

    tokens: List[int]


def validation_error(e: ValidationError):
    """(a message naming the first bad field, that field's top-level name) of a ValidationError."""
    err = e.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"] if not str(part).startswith(("function-", "union["))]
    loc = [part for part in loc if part not in ("str", "list[int]", "list[union[str,list[int]]]", "int")]
    name = ".".join(loc) or "body"
    if err["type"] == "extra_forbidden":
        return f"'{name}' is not a field this endpoint knows; remove it (see the server's README)", name.split(".")[0]
    message = err["msg"].removeprefix("Value error, ")
    field = name.split(".")[-1]
    if message.startswith("'"):  # our own validators' messages name the field already
        return message, name.split(".")[0]
    if message.startswith(field + " "):  # llama.sampling's checks: "temperature must be ..., got -1"
        return f"'{name}' {message[len(field) + 1:]}", name.split(".")[0]
    got = repr(err.get("input"))
    got = got if len(got) <= 100 else got[:100] + "..."
    return f"'{name}': {message[:1].lower()}{message[1:]}, got {got}", name.split(".")[0]
