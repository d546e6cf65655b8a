"""Plumbing between HTTP requests and backend output streams.

A `BackendStream` is one backend request: `open()` waits for its first output (so errors before
the first token become HTTP statuses), `next()` pulls the next cumulative output, `close()`
aborts it unless it finished. Whoever opens streams closes them with `close_all` on every path;
cleanup runs shielded from cancellation, because a client disconnect cancels the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
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


def as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, NoCapacityError):
        return APIError(503, str(error), type=ErrorType.SERVICE_UNAVAILABLE)
    if isinstance(error, ValueError):
        return APIError(400, str(error), param=getattr(error, "param", None))
    logger.error("backend request failed", exc_info=error)
    return APIError(500, f"{type(error).__name__}: {error}", type=ErrorType.SERVER)


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
                raise as_api_error(e) from e
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
            raise as_api_error(e) from e
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


async def event_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """`chunks`, then `[DONE]`; an error after the first chunk becomes an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # headers are sent: the error goes in the stream
        yield sse(as_api_error(e).body())
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
