"""until_deadline: the deadline ends a stream that waits or a consumer that reads too slowly,
the stream's cleanup always runs (before the error), and the stream's own errors pass."""

from __future__ import annotations

import asyncio

import pytest

from pdray.router.deadline import RequestTimeoutError, until_deadline


class Stream:
    """Yields `items`, then ends (`ends`), raises `error` or waits forever; `closed` once its
    cleanup ran."""

    def __init__(self, items=(), error=None, swallow: bool = False, ends: bool = False):
        self.items, self.error, self.swallow, self.ends = list(items), error, swallow, ends
        self.closed = False

    async def run(self):
        try:
            for item in self.items:
                yield item
            if self.ends:
                return
            if self.error is not None:
                raise self.error
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if not self.swallow:
                    raise
                yield "late"  # a stream that ignores the cancellation
        finally:
            await asyncio.sleep(0)  # cleanup that awaits, as aborting on instances does
            self.closed = True


async def collect(stream: Stream, timeout_s: float, pause_s: float = 0.0) -> list:
    loop = asyncio.get_running_loop()
    got = []
    async for item in until_deadline(stream.run(), loop.time() + timeout_s, "too late"):
        got.append(item)
        await asyncio.sleep(pause_s)
    return got


@pytest.mark.anyio
@pytest.mark.parametrize("swallow", [False, True])
async def test_a_waiting_stream_is_cancelled_cleaned_up_and_timed_out(swallow):
    stream = Stream([1, 2], swallow=swallow)
    with pytest.raises(RequestTimeoutError, match="too late"):
        await asyncio.wait_for(collect(stream, 0.2), 5)
    assert stream.closed


@pytest.mark.anyio
async def test_a_slow_consumer_uses_up_the_time():
    stream = Stream(range(100))
    with pytest.raises(RequestTimeoutError):
        await asyncio.wait_for(collect(stream, 0.2, pause_s=0.05), 5)
    assert stream.closed


@pytest.mark.anyio
async def test_the_streams_own_errors_pass_and_a_finished_stream_ends():
    with pytest.raises(TimeoutError, match="its own") as info:
        await collect(Stream([1], error=TimeoutError("its own")), 5)
    assert not isinstance(info.value, RequestTimeoutError)
    done = Stream([1, 2], ends=True)
    assert await collect(done, 5) == [1, 2] and done.closed
