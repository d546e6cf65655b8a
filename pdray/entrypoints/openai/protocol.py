"""OpenAI API subset: request bodies, responses, stream chunks and errors (pydantic v2).

Request models validate strictly (a string where a number belongs is a 400, not a coercion) but
ignore fields they do not know, since clients send many. Parsing refuses what no engine should
see: NaN and infinite floats (Python's json reads `NaN`/`Infinity`; pydantic's parser does too),
integers outside signed 64 bits (`seed` is refused beyond them, as in vLLM). Bounds of this
server live in `to_sampling_params()` (`n`/`best_of` <= max_n, stop strings, echo/max_tokens);
value checks of the engine live in `SamplingParams` (`logprobs`/`top_logprobs` <= 20, vLLM's
default), whose `ValueError` becomes an `InvalidRequestError` naming the request field. Responses
carry no infinities (a -inf logprob is sent as -9999.0, as vLLM and OpenAI do); `EchoPrompt`
puts a prompt, and its logprobs, before a completion.
"""

from __future__ import annotations

import enum
import functools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from pdray.outputs import Logprob, RequestOutput
from pdray.sampling_params import SamplingParams

# Server limits (defaults of build_openai_app / AppArgs). OpenAI documents n <= 128; vLLM sets no
# bound, and n=10000 starved every other request, so the bound is a server argument.
DEFAULT_MAX_N = 128
# 16 MiB holds ~20 prompts of 128k token ids (lm-eval batches) and keeps JSON parsing < 0.2 s.
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
MAX_STOP_STRINGS = 16  # OpenAI allows 4; lm-eval sends a task's `until` list, a handful
MAX_STOP_CHARS = 256  # per stop string: held-back text is checked against every prefix of each
MAX_STOP_TOKEN_IDS = 1024
# A prompt string longer than max_model_len * this many characters cannot fit: it is refused
# before tokenizing (tokens of real vocabularies average 3-5 characters; 10 MB took 16 s).
MAX_CHARS_PER_TOKEN = 32

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

Prompt = str | list[str] | list[int] | list[list[int]]


class NoCapacityError(RuntimeError):
    """No instance can take the request now (the HTTP layer answers 503)."""


class InvalidRequestError(ValueError):
    """A request the server cannot serve as sent (the HTTP layer answers 400)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ErrorType(str, enum.Enum):
    INVALID_REQUEST = "invalid_request_error"
    SERVICE_UNAVAILABLE = "service_unavailable_error"
    SERVER = "server_error"
    TIMEOUT = "timeout"


class ErrorInfo(BaseModel):
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests -------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class ChatRole(str, enum.Enum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ContentPart(_Body):
    type: str = Field(description="Only 'text' parts are supported.")
    text: str | None = None


class ChatMessage(_Body):
    role: ChatRole = Field(strict=False, description="Who wrote the message.")
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"content part type {part.type!r} is not supported; send text parts",
                    param="messages",
                )
        return "".join(part.text for part in self.content)


_PARAM_IN_ERROR = re.compile(r"^SamplingParams\.(\w+)")
_MAX_ERROR_CHARS = 500


class _SamplingRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI names plus vLLM extras)."""

    model: str | None = Field(None, description="The served model's name; None means it.")
    temperature: float | None = Field(None, description="0 is greedy; default 1.")
    top_p: float | None = None
    top_k: Int64 | None = Field(None, description="0 or -1 disables top-k.")
    min_p: float | None = None
    n: Int64 = Field(1, description="Completions per prompt (<= the server's max_n).")
    stop: str | list[str] | None = Field(None, description="Strings that end a completion.")
    stop_token_ids: list[Int64] | None = None
    seed: Int64 | None = Field(None, description="Signed 64-bit, as in vLLM.")
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = Field(None, description="Not supported if non-empty.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def _check_common(self, max_n: int) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        if self.n > max_n:
            raise InvalidRequestError(
                f"`n` must be at most {max_n} on this server, got {self.n}", param="n"
            )
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"`stop` holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop"
            )
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise InvalidRequestError(
                f"each `stop` string has at most {MAX_STOP_CHARS} characters", param="stop"
            )
        if len(self.stop_token_ids or ()) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"`stop_token_ids` holds at most {MAX_STOP_TOKEN_IDS} ids", param="stop_token_ids"
            )
        self._check_finite()

    def _check_finite(self) -> None:
        """Parsing refuses NaN and infinities; this keeps models built in Python honest too
        (SamplingParams accepts NaN/inf temperature and repetition_penalty)."""
        for name, value in self:
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(f"`{name}` must be a finite number", param=name)

    def _build(
        self,
        max_n: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        self._check_common(max_n)
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "prompt_logprobs": prompt_logprobs,
        }
        try:
            return SamplingParams(
                n=self.n,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                **{k: v for k, v in given.items() if v is not None},
            )
        except ValueError as e:
            raise self._request_error(e) from None

    def _request_error(self, error: ValueError) -> InvalidRequestError:
        text = str(error)
        if len(text) > _MAX_ERROR_CHARS:  # it quotes the value: maybe a long list
            text = text[: _MAX_ERROR_CHARS - 3] + "..."
        match = _PARAM_IN_ERROR.match(text)
        if match is None:
            return InvalidRequestError(text)
        param = self.field_name(match.group(1))
        return InvalidRequestError(f"`{param}`{text[match.end() :]}", param=param)

    def field_name(self, name: str) -> str:
        """The request field that sets SamplingParams.<name>."""
        return name

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    max_tokens: Int64 | None = Field(
        16, description="Most tokens generated per completion; 0 only with echo (prompt only)."
    )
    logprobs: Int64 | None = Field(None, description="Top-k log-probabilities per token (<= 20).")
    echo: bool = Field(
        False, description="Return the prompt before the completion (with logprobs: its own)."
    )
    best_of: Int64 | None = Field(None, description="Only best_of == n (or unset) is supported.")
    suffix: str | None = Field(None, description="Not supported.")

    @property
    def echo_only(self) -> bool:
        """max_tokens=0 with echo: score the prompt, generate nothing (lm-eval's loglikelihood).
        The engine generates one token, which the response leaves out."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, max_n: int = DEFAULT_MAX_N) -> SamplingParams:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None:
            if not 1 <= self.best_of <= max_n:
                raise InvalidRequestError(
                    f"`best_of` must be in [1, {max_n}] on this server, got {self.best_of}",
                    param="best_of",
                )
            if self.best_of != self.n:
                raise InvalidRequestError(
                    f"`best_of` other than n ({self.n}) is not supported", param="best_of"
                )
        max_tokens = self.max_tokens
        if self.echo_only:
            if self.min_tokens > 0:
                raise InvalidRequestError(
                    "`min_tokens` must be 0 when max_tokens is 0", param="min_tokens"
                )
            max_tokens = 1
        elif max_tokens == 0:
            raise InvalidRequestError(
                "`max_tokens` must be >= 1 (0 is allowed with echo: the prompt alone)",
                param="max_tokens",
            )
        prompt_logprobs = self.logprobs if self.echo else None
        return self._build(max_n, max_tokens, self.logprobs, prompt_logprobs)

    def field_name(self, name: str) -> str:
        return "logprobs" if name == "prompt_logprobs" else name


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: Int64 | None = Field(None, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: Int64 | None = Field(None, description="Most tokens generated.")
    logprobs: bool = Field(False, description="Return log-probabilities of the output tokens.")
    top_logprobs: Int64 | None = Field(None, description="Most likely tokens per position (<= 20).")
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported if non-empty.")

    def to_sampling_params(self, max_n: int = DEFAULT_MAX_N) -> SamplingParams:
        if self.tools:
            raise InvalidRequestError("tool calling is not supported", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs set to true", param="top_logprobs"
            )
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        elif self.max_tokens is not None:
            raise InvalidRequestError(
                "give max_completion_tokens or max_tokens, not both", param="max_tokens"
            )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._build(max_n, max_tokens, logprobs)

    def field_name(self, name: str) -> str:
        if name == "max_tokens" and self.max_tokens is None:
            return "max_completion_tokens"
        return {"logprobs": "top_logprobs"}.get(name, name)


# -- responses ------------------------------------------------------------------------------------


def _now_s() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    """OpenAI's usage; a PD request also reports `pdray_spans_s` (deployments/metrics.Span)."""

    model_config = ConfigDict(extra="allow")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now_s)
    owned_by: str = "pdray"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- engine logprobs -> OpenAI logprobs -----------------------------------------------------------

# What vLLM and OpenAI send for a -inf log-probability (JSON has no infinities).
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    top = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    return sorted(top, key=lambda item: item[1].rank)


def _token_text(token_id: int, lp: Logprob | None, decode: Callable[[int], str] | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return decode(token_id) if decode is not None else f"token_id:{token_id}"


def completion_logprobs(
    token_ids: list[int],
    entries: list[dict[int, Logprob] | None],
    k: int,
    text_offset: int,
    decode: Callable[[int], str] | None = None,
) -> CompletionLogprobs:
    """Legacy completions format: each token, its log-probability and the top-k of its position
    (the token included). An entry None (the first prompt token of an echo) has no
    log-probability: None in token_logprobs and top_logprobs. `decode` names tokens whose entry
    carries no text."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            token = _token_text(token_id, None, decode)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            sampled = entry[token_id]
            token = _token_text(token_id, sampled, decode)
            out.token_logprobs.append(_finite(sampled.logprob))
            top = {_token_text(t, lp, decode): _finite(lp.logprob) for t, lp in _ranked(entry, k)}
            top.setdefault(token, _finite(sampled.logprob))
            out.top_logprobs.append(top)
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        sampled = entry[token_id]
        token = _token_text(token_id, sampled, None)
        top = [
            TopLogprob(
                token=(text := _token_text(t, lp, None)),
                logprob=_finite(lp.logprob),
                bytes=_bytes(text),
            )
            for t, lp in _ranked(entry, k)
        ]
        content.append(
            TokenLogprob(
                token=token,
                logprob=_finite(sampled.logprob),
                bytes=_bytes(token),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


# -- echo -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class EchoPrompt:
    """What `echo` puts before each choice of one prompt: its text, and with logprobs its tokens
    (the first has no logprob: None, as in vLLM and OpenAI)."""

    text: str
    token_ids: list[int]
    first_token: str  # the first token's text: its logprob entry (None) does not carry it
    logprobs: CompletionLogprobs | None = None

    def prompt_logprobs(self, out: RequestOutput, k: int) -> CompletionLogprobs:
        """The prompt's tokens in the legacy format (built once, from the first output)."""
        if self.logprobs is None:
            entries = out.prompt_logprobs
            if entries is None or len(entries) != len(self.token_ids):
                got = "no" if entries is None else len(entries)
                raise RuntimeError(
                    f"the backend returned {got} prompt logprobs for {len(self.token_ids)} "
                    "prompt tokens"
                )
            first = self.token_ids[0]
            names = functools.partial(_first_or_id, first, self.first_token)
            self.logprobs = completion_logprobs(self.token_ids, entries, k, 0, decode=names)
        return self.logprobs

    @property
    def end_offset(self) -> int:
        """text_offset of the first generated token (tokens' lengths summed, as vLLM does)."""
        if self.logprobs is None or not self.logprobs.tokens:
            return 0
        return self.logprobs.text_offset[-1] + len(self.logprobs.tokens[-1])


def _first_or_id(first_id: int, first_text: str, token_id: int) -> str:
    return first_text if token_id == first_id else f"token_id:{token_id}"


def joined_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )
