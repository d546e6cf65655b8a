"""A request's end-to-end deadline (`request_timeout_s`) over the async stream of its outputs.

`until_deadline(outputs, deadline, message)` passes the outputs of an async generator on until
the event loop's clock reaches `deadline`; then it cancels the generator where it waits, lets
its cleanup run (the router's aborts the request on every instance it placed it on, freeing its
blocks) and raises `RequestTimeoutError(message)`. The deadline is enforced around each wait for
the next output, never across a yield, so a consumer that reads slowly only uses up the time
(checked again before each wait). The generator is closed on every path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


class RequestTimeoutError(RuntimeError):
    """A request did not finish within its end-to-end deadline; it was aborted on its instances.
    The HTTP layer answers 504 (an OpenAI error object of type "timeout")."""


async def until_deadline(
    outputs: AsyncGenerator[T, None], deadline: float, message: str
) -> AsyncIterator[T]:
    loop = asyncio.get_running_loop()
    try:
        while True:
            if loop.time() >= deadline:
                raise RequestTimeoutError(message)
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    item = await anext(outputs)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if scope.expired():
                    raise RequestTimeoutError(message) from None
                raise  # the stream's own
            if scope.expired():  # the stream swallowed the cancellation: its item is too late
                raise RequestTimeoutError(message)
            yield item
    finally:
        await outputs.aclose()
