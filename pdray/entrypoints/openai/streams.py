"""Plumbing between HTTP requests and backend output streams.

A `BackendStream` is one backend request: `open()` waits for its first output (so errors before
the first token become HTTP statuses), `next()` pulls the next cumulative output, `close()`
aborts it unless it finished. Whoever opens streams closes them with `close_all` on every path;
cleanup runs shielded from cancellation, because a client disconnect cancels the handler.

Errors reach the client as `APIError`s (`as_api_error`) that carry no internals: a bad request
keeps only the message of the exception a replica raised (out of Ray's `RayTaskError`, whose text
names the actor, its pid and address, and the traceback), anything unexpected is a 500 that
names only the request id, under which the server logs the whole error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdray.engine.detokenizer import num_streamable_chars
from pdray.entrypoints.openai.protocol import (
    ErrorInfo,
    ErrorResponse,
    ErrorType,
    NoCapacityError,
)
from pdray.outputs import CompletionOutput, RequestOutput
from pdray.router.deadline import RequestTimeoutError
from pdray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdray.entrypoints.openai.api import ServingBackend

logger = logging.getLogger(__name__)
T = TypeVar("T")


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: ErrorType = ErrorType.INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(mode="json"), status_code=self.status_code)


# Text that only the server should see: Ray's task and actor errors, process ids, tracebacks,
# object reprs. Addresses (URLs, IPv4 with a port) are replaced by "<address>".
_INTERNAL = re.compile(
    r"ray::|Ray[A-Za-z]*Error|ActorDiedError|ServeReplica|\b(?:pid|ip|actor_id|node_id)=|"
    r"Traceback \(most recent call last\)|^\s*File \"|\b0x[0-9a-fA-F]{6,}\b",
    re.MULTILINE,
)
_ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)]+|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
# The last line of a traceback: "ValueError: message" (the exception a replica raised).
_EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): (.+)$")
_MAX_MESSAGE_CHARS = 1000


def _is_ray_error(error: BaseException) -> bool:
    return any(cls.__name__ in ("RayError", "RayTaskError") for cls in type(error).__mro__)


def remote_cause(error: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrappers. A RayTaskError keeps it in `cause`
    (Ray Serve raises `RayTaskError(ValueError)`, an instance of both, whose str is Ray's text);
    an error re-raised with such text (`raise ValueError(str(e)) from None`) keeps the wrapper in
    `__context__`. Ray is not imported: the wrappers are recognised by class name."""
    for _ in range(16):  # a replica calling a replica wraps twice; a cycle ends here
        cause = getattr(error, "cause", None) if _is_ray_error(error) else None
        if isinstance(cause, BaseException) and cause is not error:
            error = cause
            continue
        inner = error.__cause__ or error.__context__
        if inner is not None and _INTERNAL.search(str(error)):
            error = inner
            continue
        break
    return error


def client_message(error: BaseException, *, from_traceback: bool = True) -> str | None:
    """What a client may read of `error`: the original exception's message (one line), or None
    when nothing of it is free of internals. With `from_traceback`, text that holds a traceback
    gives its last line's message (the exception raised at its end)."""
    text = str(remote_cause(error)).strip()
    if _INTERNAL.search(text):
        if not from_traceback:
            return None
        lines = (_EXCEPTION_LINE.match(line) for line in reversed(text.splitlines()))
        text = next((m.group(1).strip() for m in lines if m is not None), "")
    text = _ADDRESS.sub("<address>", text.splitlines()[0].strip() if text else "")
    if not text or _INTERNAL.search(text):
        return None
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def internal_error(request_id: str | None) -> APIError:
    where = f"; the server logged it under request id {request_id}" if request_id else ""
    return APIError(500, f"internal server error{where}", type=ErrorType.SERVER)


def as_api_error(error: Exception, request_id: str | None = None) -> APIError:
    """400 for a ValueError, 503 for NoCapacityError, 504 for RequestTimeoutError, else a 500
    naming only `request_id`; the server logs what the client does not see."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestTimeoutError):  # request_timeout_s ran out; it was aborted
        message = client_message(error, from_traceback=False) or "the request timed out"
        return APIError(504, message, type=ErrorType.TIMEOUT)
    if isinstance(error, NoCapacityError):  # the router's words, maybe quoting a replica's error
        message = client_message(error, from_traceback=False)
        if message != str(error):
            logger.warning("request %s: no capacity: %s", request_id, error)
        message = message or "no instance can take the request now; try again later"
        return APIError(503, message, type=ErrorType.SERVICE_UNAVAILABLE)
    if isinstance(error, ValueError):
        message = client_message(error)
        if message != str(error):
            logger.warning("request %s refused: %s", request_id, error)
        message = message or f"the request was refused (request id {request_id})"
        return APIError(400, message, param=getattr(error, "param", None))
    logger.error("request %s failed", request_id, exc_info=error)
    return internal_error(request_id)


# A body this many times over the limit is not read to its end before the 413 (the connection is
# closed instead); under it, the rest is read and dropped, so that the client, still sending,
# gets to read the answer.
_DRAIN_FACTOR = 4


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, or a 413 when it is over `max_bytes` (known from Content-Length or
    found while reading: a chunked body has none)."""
    too_large = APIError(
        413,
        f"The request body is larger than this server's limit of {max_bytes} bytes "
        "(max_request_body_bytes)",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _DRAIN_FACTOR * max_bytes:
        raise too_large
    chunks, num_bytes = [], 0
    async for chunk in request.stream():
        num_bytes += len(chunk)
        if num_bytes <= max_bytes:
            chunks.append(chunk)
        elif num_bytes > _DRAIN_FACTOR * max_bytes:
            break
    if num_bytes > max_bytes:
        raise too_large
    return b"".join(chunks)


class BackendStream:
    """One backend request of an HTTP request (a completions request has one per prompt)."""

    def __init__(
        self, backend: ServingBackend, request_id: str, prompt: list[int], params: SamplingParams
    ):
        self.backend = backend
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.first: RequestOutput | None = None
        self.finished = False
        self._outputs: AsyncIterator[RequestOutput] | None = None
        self._closed = False

    async def open(self) -> None:
        outputs: Any = self.backend.generate(self.request_id, self.prompt, self.params)
        if inspect.isawaitable(outputs):
            try:
                outputs = await outputs
            except Exception as e:
                raise as_api_error(e, self.request_id) from e
        self._outputs = outputs
        self.first = await self.next()

    async def next(self) -> RequestOutput | None:
        """The next cumulative output, or None after the finished one."""
        if self.finished:
            return None
        try:
            out = await anext(self._outputs)
        except StopAsyncIteration:
            raise APIError(
                500, f"the backend ended request {self.request_id} before it finished",
                type=ErrorType.SERVER,
            ) from None  # fmt: skip
        except Exception as e:
            raise as_api_error(e, self.request_id) from e
        self.finished = out.finished
        return out

    async def close(self) -> None:
        """Abort the request unless it finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            try:
                await self.backend.abort(self.request_id)
            except Exception:
                logger.exception("aborting %s failed", self.request_id)
        aclose = getattr(self._outputs, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def open_all(streams: list[BackendStream]) -> None:
    """Open every stream concurrently; on the first error close them all and raise it."""
    tasks = [asyncio.ensure_future(s.open()) for s in streams]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
        raise


async def close_all(streams: list[BackendStream]) -> None:
    with anyio.CancelScope(shield=True):
        for stream in streams:
            await stream.close()


async def merged(streams: list[BackendStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) in arrival order, each stream's first output first."""
    if len(streams) == 1:
        out = streams[0].first
        while out is not None:
            yield 0, out
            out = await streams[0].next()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: BackendStream) -> None:
        try:
            out = stream.first
            while out is not None:
                queue.put_nowait((i, out, None))
                out = await stream.next()
            queue.put_nowait((i, None, None))
        except Exception as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect(streams: list[BackendStream]) -> list[RequestOutput]:
    finals: list[Any] = [None] * len(streams)
    async for i, out in merged(streams):
        finals[i] = out
    return finals


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected
    return work_task.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass(slots=True)
class Delta:
    text: str
    token_start: int
    token_end: int
    finish_reason: str | None


@dataclass(slots=True)
class Cursor:
    """How much of one choice has been sent."""

    num_chars: int = 0
    num_tokens: int = 0
    done: bool = False

    def advance(self, output: CompletionOutput, stops: list[str]) -> Delta | None:
        """What to send for this cumulative output, or None (nothing new, or already done)."""
        if self.done:
            return None
        finished = output.finish_reason is not None
        text = output.text
        end = len(text) if finished or not stops else num_streamable_chars(text, stops)
        new_text = text[self.num_chars : end] if end > self.num_chars else ""
        if not new_text and not finished:
            return None
        delta = Delta(new_text, self.num_tokens, len(output.token_ids), output.finish_reason)
        self.num_chars = max(self.num_chars, end)
        self.num_tokens = len(output.token_ids)
        self.done = finished
        return delta


def sse(payload: BaseModel | None, include_usage: bool = False) -> str:
    """One server-sent event; None is the closing `[DONE]`."""
    if payload is None:
        return "data: [DONE]\n\n"
    exclude = None if include_usage or not hasattr(payload, "usage") else {"usage"}
    return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"


async def event_stream(chunks: AsyncIterator[str], request_id: str) -> AsyncIterator[str]:
    """`chunks`, then `[DONE]`; an error after the first chunk becomes an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # headers are sent: the error goes in the stream
        yield sse(as_api_error(e, request_id).body())
    finally:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
    yield sse(None)


class EventStreamResponse(StreamingResponse):
    """SSE response that stops at a client disconnect whatever the server's ASGI version, and
    always runs `on_close` at the end (which aborts unfinished backend requests), even when the
    client is gone before the first chunk."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], *, on_close: Callable[[], Awaitable[None]] | None = None
    ):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                if self.on_close is not None:
                    await self.on_close()
