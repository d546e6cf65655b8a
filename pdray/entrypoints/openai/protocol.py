"""OpenAI API subset: request bodies, responses, stream chunks and errors (pydantic v2).

Request models validate strictly (a string where a number belongs is a 400, not a coercion) but
ignore fields they do not know, since clients send many. Value checks live in `SamplingParams`;
`to_sampling_params()` turns its `ValueError` into an `InvalidRequestError` naming the field.
"""

from __future__ import annotations

import enum
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from pdray.outputs import Logprob
from pdray.sampling_params import SamplingParams

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


class ErrorInfo(BaseModel):
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests -------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


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


class _SamplingRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI names plus vLLM extras)."""

    model: str | None = Field(None, description="The served model's name; None means it.")
    temperature: float | None = Field(None, description="0 is greedy; default 1.")
    top_p: float | None = None
    top_k: int | None = Field(None, description="0 or -1 disables top-k.")
    min_p: float | None = None
    n: int = Field(1, description="Completions per prompt.")
    stop: str | list[str] | None = Field(None, description="Strings that end a completion.")
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = Field(None, description="Not supported if non-empty.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")

    def _build(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self._check_common()
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
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
        match = _PARAM_IN_ERROR.match(str(error))
        if match is None:
            return InvalidRequestError(str(error))
        param = self.field_name(match.group(1))
        return InvalidRequestError(f"`{param}`{str(error)[match.end() :]}", param=param)

    def field_name(self, name: str) -> str:
        """The request field that sets SamplingParams.<name>."""
        return name

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    max_tokens: int | None = Field(16, description="Most tokens generated per completion.")
    logprobs: int | None = Field(None, description="Top-k log-probabilities per token (<= 20).")
    echo: bool = Field(False, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        return self._build(self.max_tokens, self.logprobs)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, description="Most tokens generated.")
    logprobs: bool = Field(False, description="Return log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(None, description="Most likely tokens per position (<= 20).")
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported if non-empty.")

    def to_sampling_params(self) -> SamplingParams:
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
        return self._build(max_tokens, logprobs)

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


def _ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    top = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    return sorted(top, key=lambda item: item[1].rank)


def _token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], k: int, text_offset: int
) -> CompletionLogprobs:
    """Legacy completions format: the sampled token plus the top-k of each position."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        sampled = entry[token_id]
        token = _token_text(token_id, sampled)
        out.tokens.append(token)
        out.token_logprobs.append(sampled.logprob)
        top = {_token_text(t, lp): lp.logprob for t, lp in _ranked(entry, k)}
        top.setdefault(token, sampled.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        sampled = entry[token_id]
        token = _token_text(token_id, sampled)
        top = [
            TopLogprob(token=(text := _token_text(t, lp)), logprob=lp.logprob, bytes=_bytes(text))
            for t, lp in _ranked(entry, k)
        ]
        content.append(
            TokenLogprob(
                token=token, logprob=sampled.logprob, bytes=_bytes(token), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
