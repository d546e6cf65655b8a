"""OpenAI-compatible HTTP front end (FastAPI) over a `ServingBackend`.

Request lifecycle:
  parse the body strictly (400) -> check the model name (404) -> sampling params (400) ->
  tokenize, check lengths and token ids (400) -> open one backend stream per prompt and wait for
  each one's first output (NoCapacityError -> 503, ValueError -> 400) -> stream SSE deltas or
  build one response -> close: every stream that has not finished is aborted with
  `backend.abort(request_id)`, on every path (client disconnect, error, cancellation).

Streamed text is the difference between cumulative outputs, per choice; text that could still
become part of a stop string is held back until it cannot, so nothing is ever sent twice.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdray.entrypoints.openai.local_backend import LocalEngineBackend
from pdray.entrypoints.openai.protocol import (
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
    ErrorType,
    InvalidRequestError,
    ModelCard,
    ModelList,
    NoCapacityError,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
)
from pdray.entrypoints.openai.streams import (
    APIError,
    BackendStream,
    ClientDisconnected,
    Cursor,
    Delta,
    EventStreamResponse,
    close_all,
    collect,
    event_stream,
    merged,
    open_all,
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
    backend: ServingBackend, *, model_name: str, api_key: str | None = None
) -> FastAPI:
    """The OpenAI API subset over `backend`; with `api_key`, /v1 routes need `Bearer <key>`."""
    app = FastAPI(title="pdray", description="OpenAI-compatible API of a pdray deployment")
    server = _OpenAIServer(backend, model_name)

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
        body = _parse(CompletionRequest, await request.body())
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await request.body())
        return await server.chat(body, request)

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
                raise APIError(503, f"unhealthy: {e}", type=ErrorType.SERVICE_UNAVAILABLE) from e
        return {"status": "ok"}

    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, str(exc.errors())).response()

    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
        return APIError(500, message, type=ErrorType.SERVER).response()

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
            f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}"
            for err in errors[:3]
        )
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise APIError(400, f"invalid request body: {details}{more}", param=param) from None


class _OpenAIServer:
    def __init__(self, backend: ServingBackend, model_name: str):
        self.backend = backend
        self.model_name = model_name
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.backend.tokenizer()
        return self._tokenizer

    # -- validation -------------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def _params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        self._check_model(body.model)
        try:
            return body.to_sampling_params()
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model `{self.model_name}` has no chat template")
        try:
            conversation = [{"role": m.role.value, "content": m.text()} for m in body.messages]
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        except Exception as e:  # jinja raises template-defined errors ("roles must alternate")
            raise APIError(400, f"cannot render the chat template: {e}", param="messages") from e
        return tokenizer.encode(text, add_special_tokens=False)

    def _check_prompt(
        self, ids: list[int], params: SamplingParams, *, param: str, max_tokens_param: str
    ) -> None:
        max_len, vocab_size = self.backend.max_model_len, self.backend.vocab_size
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param
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
                    event_stream(events(streams)), on_close=lambda: close_all(streams)
                )
            try:
                finals = await until_disconnect(request, collect(streams))
            finally:
                await close_all(streams)
        except ClientDisconnected:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(build(finals).model_dump(mode="json"))

    # -- completions ------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        params = self._params(body)
        prompts = self._completion_prompts(body.prompt)
        for ids in prompts:
            self._check_prompt(ids, params, param="prompt", max_tokens_param="max_tokens")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": request_id, "model": self.model_name}

        def build(finals: list[RequestOutput]) -> CompletionResponse:
            choices = [
                self._completion_choice(i * params.n + c.index, c, params, c.text, 0, None)
                for i, out in enumerate(finals)
                for c in out.outputs
            ]
            return CompletionResponse(**head, choices=choices, usage=_usage(finals))

        async def events(streams: list[BackendStream]) -> AsyncIterator[str]:
            template = CompletionResponse(**head, choices=[])
            cursors: dict[tuple[int, int], Cursor] = {}
            finals: list[Any] = [None] * len(streams)
            async for i, out in merged(streams):
                finals[i] = out
                for c in out.outputs:
                    cursor = cursors.setdefault((i, c.index), Cursor())
                    text_offset = cursor.num_chars
                    delta = cursor.advance(c, params.stop)
                    if delta is not None:
                        index = i * params.n + c.index
                        choice = self._completion_choice(index, c, params, "", text_offset, delta)
                        chunk = template.model_copy(update={"choices": [choice]})
                        yield sse(chunk, body.include_usage)
            if body.include_usage:
                yield sse(template.model_copy(update={"usage": _usage(finals)}), True)

        return await self._respond(
            request, request_id, prompts, params, stream=body.stream, events=events, build=build
        )

    @staticmethod
    def _completion_choice(
        index: int,
        c: CompletionOutput,
        params: SamplingParams,
        text: str,
        text_offset: int,
        delta: Delta | None,
    ) -> CompletionChoice:
        """A whole choice (delta None) or the piece of it in `delta`."""
        tokens = slice(delta.token_start, delta.token_end) if delta else slice(None)
        logprobs = None
        if params.logprobs is not None:
            logprobs = completion_logprobs(
                c.token_ids[tokens], c.logprobs[tokens], params.logprobs, text_offset
            )
        return CompletionChoice(
            index=index,
            text=delta.text if delta else text,
            logprobs=logprobs,
            finish_reason=delta.finish_reason if delta else c.finish_reason,
        )

    # -- chat -------------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        params = self._params(body)
        ids = self._chat_prompt(body)
        self._check_prompt(
            ids, params, param="messages", max_tokens_param=body.field_name("max_tokens")
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
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


def _usage(finals: list[RequestOutput | None]) -> UsageInfo:
    done = [out for out in finals if out is not None]
    prompt = sum(len(out.prompt_token_ids) for out in done)
    completion = sum(len(c.token_ids) for out in done for c in out.outputs)
    spans = {k[5:]: v for out in done[:1] for k, v in out.metrics.items() if k.startswith("span:")}
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        **({"pdray_spans_s": spans} if spans else {}),
    )  # fmt: skip
