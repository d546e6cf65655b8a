"""OpenAI-compatible HTTP front end (FastAPI) over a `ServingBackend`.

Request lifecycle:
  read the body up to max_request_body_bytes (413) -> parse it strictly (400) -> check the model
  name (404) -> sampling params and this server's bounds (400) -> refuse a prompt too long to fit
  by its characters alone, then tokenize on the tokenizer's own thread, check lengths and token
  ids (400) -> open one backend stream per prompt and wait for each one's first output
  (NoCapacityError -> 503, ValueError -> 400) -> stream SSE deltas or build one response ->
  close: every stream that has not finished is aborted with `backend.abort(request_id)`, on every
  path (client disconnect, error, cancellation). Anything unexpected is a 500 that names only the
  request id; the server logs the error under it (streams.as_api_error).

Streamed text is the difference between cumulative outputs, per choice; text that could still
become part of a stop string is held back until it cannot, so nothing is ever sent twice.

`echo` (completions) puts the prompt before each choice's text, and with `logprobs` its tokens
before the generated ones (the first with no logprob: None), as vLLM and OpenAI do; lm-eval's
loglikelihood reads them. `max_tokens: 0` with echo scores the prompt alone: the engine
generates one token, which the response leaves out (and does not count in usage).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdray.entrypoints.openai.local_backend import LocalEngineBackend
from pdray.entrypoints.openai.protocol import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    MAX_CHARS_PER_TOKEN,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EchoPrompt,
    ErrorType,
    InvalidRequestError,
    ModelCard,
    ModelList,
    NoCapacityError,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
    joined_logprobs,
)
from pdray.entrypoints.openai.streams import (
    APIError,
    BackendStream,
    ClientDisconnected,
    Cursor,
    Delta,
    EventStreamResponse,
    client_message,
    close_all,
    collect,
    event_stream,
    internal_error,
    merged,
    open_all,
    read_body,
    sse,
    until_disconnect,
)
from pdray.outputs import CompletionOutput, RequestOutput
from pdray.sampling_params import SamplingParams

__all__ = [
    "APIError",
    "LocalEngineBackend",
    "NoCapacityError",
    "ServingBackend",
    "build_openai_app",
]

logger = logging.getLogger(__name__)


class ServingBackend(Protocol):
    """What the HTTP layer needs from whatever runs the model (one engine, or a PD router).

    `generate` is an async generator function (a coroutine returning an async iterator also
    works): it yields cumulative `RequestOutput`s until one has `finished`, and raises
    `NoCapacityError` when no instance can take the request, `ValueError` for a bad request.
    The app always passes token ids. `abort` must be idempotent and accept ids that are unknown
    or already finished. An optional `check_health()` (plain or async) makes /health answer 503
    when it raises.
    """

    max_model_len: int
    vocab_size: int

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def tokenizer(self) -> Any: ...


def build_openai_app(
    backend: ServingBackend,
    *,
    model_name: str,
    api_key: str | None = None,
    max_n: int = DEFAULT_MAX_N,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
) -> FastAPI:
    """The OpenAI API subset over `backend`; with `api_key`, /v1 routes need `Bearer <key>`.
    `max_n` bounds `n` and `best_of`; a body over `max_request_body_bytes` gets a 413."""
    if max_n < 1 or max_request_body_bytes < 1:
        raise ValueError(
            f"max_n and max_request_body_bytes must be >= 1, got {max_n}, {max_request_body_bytes}"
        )
    app = FastAPI(title="pdray", description="OpenAI-compatible API of a pdray deployment")
    server = _OpenAIServer(backend, model_name, max_n=max_n)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect or missing API key; send the header `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )

    auth = [Depends(require_key)]

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        request_id = request.state.request_id = f"cmpl-{uuid.uuid4().hex}"
        raw = await read_body(request, max_request_body_bytes)
        return await server.completions(_parse(CompletionRequest, raw), request, request_id)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        request_id = request.state.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        raw = await read_body(request, max_request_body_bytes)
        return await server.chat(_parse(ChatCompletionRequest, raw), request, request_id)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=backend.max_model_len)])

    @app.get("/health")
    async def health() -> dict[str, str]:
        check = getattr(backend, "check_health", None)
        if check is not None:
            try:
                result = check()
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                logger.warning("health check failed: %s", e)
                reason = client_message(e) or "the backend is not ready"
                raise APIError(
                    503, f"unhealthy: {reason}", type=ErrorType.SERVICE_UNAVAILABLE
                ) from e
        return {"status": "ok"}

    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(".".join(_short(p) for p in err["loc"]) for err in exc.errors()[:3])
        return APIError(400, f"invalid request: {where}").response()

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None) or f"req-{uuid.uuid4().hex}"
        logger.error("request %s failed", request_id, exc_info=exc)
        return internal_error(request_id).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def _parse(model_cls: type[BaseModel], body: bytes) -> Any:
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        details = "; ".join(
            f"{'.'.join(_short(part) for part in err['loc']) or 'body'}: {err['msg']}"
            for err in errors[:3]
        )
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        param = _short(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise APIError(400, f"invalid request body: {details}{more}", param=param) from None


def _short(part: Any, max_chars: int = 64) -> str:
    """A location in the body (a field, an index, a key the client chose: maybe long)."""
    text = str(part)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


@dataclass(slots=True)
class _Prompt:
    token_ids: list[int]
    text: str | None  # as sent; None for token ids


class _OpenAIServer:
    def __init__(self, backend: ServingBackend, model_name: str, *, max_n: int):
        self.backend = backend
        self.model_name = model_name
        self.max_n = max_n
        self._tokenizer: Any = None
        # Tokenizer calls run here, one at a time: the event loop keeps serving while a long
        # prompt tokenizes (the Rust tokenizer releases the GIL), and calls never overlap
        # (a fast tokenizer used from two threads at once raises "Already borrowed").
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="pdray-tokenizer")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.backend.tokenizer()
        return self._tokenizer

    async def _on_tokenizer_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, call)

    # -- validation -------------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{_short(name)}` does not exist; this server serves "
                f"`{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def _params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        self._check_model(body.model)
        try:
            return body.to_sampling_params(max_n=self.max_n)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    def _check_num_chars(self, num_chars: int, param: str) -> None:
        """Refuse text that cannot fit before paying for its tokenization."""
        max_len = self.backend.max_model_len
        limit = max_len * MAX_CHARS_PER_TOKEN
        if num_chars > limit:
            what = "prompt" if param == "prompt" else "conversation"
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens; a {what} of "
                f"{num_chars} characters cannot fit (this server refuses more than {limit}, "
                f"{MAX_CHARS_PER_TOKEN} per token, before tokenizing); shorten it",
                param=param,
            )

    async def _completion_prompts(self, prompt: Any) -> list[_Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [_Prompt(list(prompt), None)]
        texts = [p for p in prompt if isinstance(p, str)]
        for text in texts:
            if not text:
                raise APIError(400, "the prompt holds an empty string", param="prompt")
            self._check_num_chars(len(text), "prompt")
        encoded = iter(await self._tokenize(texts, param="prompt") if texts else [])
        return [
            _Prompt(next(encoded), p) if isinstance(p, str) else _Prompt(list(p), None)
            for p in prompt
        ]

    async def _tokenize(self, texts: list[str], *, param: str, **kwargs: Any) -> list[list[int]]:
        tokenizer = self.tokenizer

        def encode_all() -> list[list[int]]:
            return [tokenizer.encode(text, **kwargs) for text in texts]

        try:
            return await self._on_tokenizer_thread(encode_all)
        except Exception as e:
            logger.warning("cannot tokenize the %s: %s: %s", param, type(e).__name__, e)
            raise APIError(400, f"the {param} cannot be tokenized", param=param) from None

    async def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model `{self.model_name}` has no chat template")
        try:
            conversation = [{"role": m.role.value, "content": m.text()} for m in body.messages]
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        self._check_num_chars(sum(len(m["content"]) for m in conversation), "messages")
        try:
            text = await self._on_tokenizer_thread(
                tokenizer.apply_chat_template,
                conversation,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
            )
        except Exception as e:  # jinja raises template-defined errors ("roles must alternate")
            raise APIError(
                400, f"cannot render the chat template: {_short(e, 500)}", param="messages"
            ) from e
        (ids,) = await self._tokenize([text], param="messages", add_special_tokens=False)
        return ids

    def _check_prompt(
        self, ids: list[int], params: SamplingParams, *, param: str, max_tokens_param: str
    ) -> None:
        max_len, vocab_size = self.backend.max_model_len, self.backend.vocab_size
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"token id {_short(bad)} is outside the vocabulary [0, {vocab_size})",
                param=param,
            )
        if len(ids) >= max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens, but the prompt has "
                f"{len(ids)} tokens; shorten it to at most {max_len - 1}",
                param=param,
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens, but you requested "
                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} "
                f"to generate); lower {max_tokens_param} or shorten the prompt",
                param=max_tokens_param,
            )
        if len(ids) + params.min_tokens > max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens, but the prompt has "
                f"{len(ids)} and min_tokens asks for {params.min_tokens} more",
                param="min_tokens",
            )

    async def _respond(
        self,
        request: Request,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        stream: bool,
        events: Callable[[list[BackendStream]], AsyncIterator[str]],
        build: Callable[[list[RequestOutput]], BaseModel],
    ) -> Response:
        """Open the backend streams, then stream `events` or return `build(final outputs)`."""
        ids = (
            [f"{request_id}-{i}" for i in range(len(prompts))] if len(prompts) > 1 else [request_id]
        )
        streams = [
            BackendStream(self.backend, i, p, params) for i, p in zip(ids, prompts, strict=True)
        ]
        try:
            await until_disconnect(request, open_all(streams))
            if stream:
                return EventStreamResponse(
                    event_stream(events(streams), request_id),
                    on_close=lambda: close_all(streams),
                )
            try:
                finals = await until_disconnect(request, collect(streams))
            finally:
                await close_all(streams)
        except ClientDisconnected:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(build(finals).model_dump(mode="json"))

    # -- completions ------------------------------------------------------------------------------

    async def completions(
        self, body: CompletionRequest, request: Request, request_id: str
    ) -> Response:
        params = self._params(body)
        prompts = await self._completion_prompts(body.prompt)
        for prompt in prompts:
            self._check_prompt(
                prompt.token_ids, params, param="prompt", max_tokens_param="max_tokens"
            )
        echoes = await self._echoes(prompts) if body.echo else None
        head = {"id": request_id, "model": self.model_name}

        def choice(i: int, out: RequestOutput, c: CompletionOutput, delta: Delta | None,
                   text_offset: int, first: bool) -> CompletionChoice:  # fmt: skip
            """Choice c of prompt i, whole (delta None) or the piece in `delta`; with echo the
            first piece starts with the prompt."""
            tokens = slice(delta.token_start, delta.token_end) if delta else slice(None)
            text = delta.text if delta else c.text
            finish_reason = delta.finish_reason if delta else c.finish_reason
            if body.echo_only:  # the one generated token is left out
                tokens, text = slice(0, 0), ""
                finish_reason = finish_reason and "length"
            k = params.logprobs
            logprobs = None
            if k is not None:
                logprobs = completion_logprobs(
                    c.token_ids[tokens], c.logprobs[tokens], k, text_offset
                )
            if echoes is not None and first:
                echo = echoes[i]
                text = echo.text + text
                if logprobs is not None:
                    logprobs = joined_logprobs(echo.prompt_logprobs(out, k), logprobs)
            return CompletionChoice(
                index=i * params.n + c.index,
                text=text,
                logprobs=logprobs,
                finish_reason=finish_reason,
            )

        def offset(i: int, out: RequestOutput) -> int:
            """text_offset of the first generated token of prompt i's choices."""
            if echoes is None or params.logprobs is None:
                return 0
            echoes[i].prompt_logprobs(out, params.logprobs)
            return echoes[i].end_offset

        def build(finals: list[RequestOutput]) -> CompletionResponse:
            choices = [
                choice(i, out, c, None, offset(i, out), True)
                for i, out in enumerate(finals)
                for c in out.outputs
            ]
            return CompletionResponse(
                **head, choices=choices, usage=_usage(finals, not body.echo_only)
            )

        async def events(streams: list[BackendStream]) -> AsyncIterator[str]:
            template = CompletionResponse(**head, choices=[])
            cursors: dict[tuple[int, int], Cursor] = {}
            started: set[tuple[int, int]] = set()  # choices whose first piece (echo) went out
            finals: list[Any] = [None] * len(streams)
            async for i, out in merged(streams):
                finals[i] = out
                for c in out.outputs:
                    if body.echo_only and c.finish_reason is None:
                        continue  # the prompt goes out with the finish (its token is dropped)
                    cursor = cursors.setdefault((i, c.index), Cursor())
                    text_offset = offset(i, out) + cursor.num_chars
                    delta = cursor.advance(c, params.stop)
                    if delta is None:
                        continue
                    first = (i, c.index) not in started
                    started.add((i, c.index))
                    piece = choice(i, out, c, delta, text_offset, first)
                    yield sse(template.model_copy(update={"choices": [piece]}), body.include_usage)
            if body.include_usage:
                usage = _usage(finals, not body.echo_only)
                yield sse(template.model_copy(update={"usage": usage}), True)

        return await self._respond(
            request,
            request_id,
            [p.token_ids for p in prompts],
            params,
            stream=body.stream,
            events=events,
            build=build,
        )

    async def _echoes(self, prompts: list[_Prompt]) -> list[EchoPrompt]:
        """The text echo returns for each prompt (token ids are decoded) and its first token."""
        tokenizer = self.tokenizer

        def texts() -> list[EchoPrompt]:
            return [
                EchoPrompt(
                    text=p.text if p.text is not None else tokenizer.decode(p.token_ids),
                    token_ids=p.token_ids,
                    first_token=tokenizer.decode(p.token_ids[:1]),
                )
                for p in prompts
            ]

        return await self._on_tokenizer_thread(texts)

    # -- chat -------------------------------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, request: Request, request_id: str
    ) -> Response:
        params = self._params(body)
        ids = await self._chat_prompt(body)
        self._check_prompt(
            ids, params, param="messages", max_tokens_param=body.field_name("max_tokens")
        )
        head = {"id": request_id, "model": self.model_name}

        def logprobs_of(c: CompletionOutput, tokens: slice) -> ChatLogprobs | None:
            if params.logprobs is None:
                return None
            return chat_logprobs(c.token_ids[tokens], c.logprobs[tokens], params.logprobs)

        def build(finals: list[RequestOutput]) -> ChatCompletionResponse:
            choices = [
                ChatCompletionChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=logprobs_of(c, slice(None)),
                    finish_reason=c.finish_reason,
                )
                for c in finals[0].outputs
            ]
            return ChatCompletionResponse(**head, choices=choices, usage=_usage(finals))

        async def events(streams: list[BackendStream]) -> AsyncIterator[str]:
            template = ChatCompletionStreamResponse(**head, choices=[])
            usage = body.include_usage
            for index in range(params.n):
                role = DeltaMessage(role="assistant", content="")
                choice = ChatCompletionStreamChoice(index=index, delta=role)
                yield sse(template.model_copy(update={"choices": [choice]}), usage)
            cursors = [Cursor() for _ in range(params.n)]
            final = None
            async for _, final in merged(streams):
                for c in final.outputs:
                    delta = cursors[c.index].advance(c, params.stop)
                    if delta is None:
                        continue
                    choice = ChatCompletionStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=delta.text or None),
                        logprobs=logprobs_of(c, slice(delta.token_start, delta.token_end)),
                        finish_reason=delta.finish_reason,
                    )
                    yield sse(template.model_copy(update={"choices": [choice]}), usage)
            if usage:
                yield sse(template.model_copy(update={"usage": _usage([final])}), True)

        return await self._respond(
            request, request_id, [ids], params, stream=body.stream, events=events, build=build
        )


def _usage(finals: list[RequestOutput | None], count_completion: bool = True) -> UsageInfo:
    done = [out for out in finals if out is not None]
    prompt = sum(len(out.prompt_token_ids) for out in done)
    completion = sum(len(c.token_ids) for out in done for c in out.outputs if count_completion)
    spans = {k[5:]: v for out in done[:1] for k, v in out.metrics.items() if k.startswith("span:")}
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        **({"pdray_spans_s": spans} if spans else {}),
    )  # fmt: skip
