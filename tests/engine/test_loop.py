"""EngineLoop: commands from any thread, wake-ups instead of polling, callers that left, a failing
step, close. A scripted worker stands in for an engine, so each case is exact and fast."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pdray.engine.futures import settle
from pdray.engine.loop import AsyncSink, EngineLoop, Inbox
from pdray.engine.role_worker import PrefillResult, RequestFailed, ends_stream
from pdray.outputs import CompletionOutput, RequestOutput


def _output(request_id: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    reason = "length" if finished else None
    choice = CompletionOutput(0, "", list(tokens), finish_reason=reason)
    return RequestOutput(request_id, None, [1], [choice], finished)


class ScriptedWorker:
    """Emits the next scripted item per request on each step; `arrived` simulates KV landing."""

    def __init__(self) -> None:
        self.engine = None
        self.script: dict[str, list] = {}
        self.waiting_for_kv: set[str] = set()
        self.steps = 0
        self.aborted: list[str] = []
        self.fail_next_step = False
        self.closed = False

    def add(self, request_id: str, items: list) -> None:
        if request_id in self.script:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.script[request_id] = list(items)

    def has_work(self) -> bool:
        return bool(self.script)

    def has_runnable_work(self) -> bool:
        return any(r not in self.waiting_for_kv for r in self.script)

    def next_deadline_s(self) -> float | None:
        return None

    def step(self, emit) -> None:
        self.steps += 1
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        for request_id in [r for r in self.script if r not in self.waiting_for_kv]:
            item = self.script[request_id].pop(0)
            if not self.script[request_id]:
                del self.script[request_id]
            emit(request_id, item)

    def abort(self, request_id: str):
        self.aborted.append(request_id)
        self.script.pop(request_id, None)
        return _output(request_id, [7])

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def loop():
    worker = ScriptedWorker()
    loop = EngineLoop(worker)
    yield loop
    loop.close(timeout_s=5)
    assert worker.closed


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


class _EndSignallingSink(AsyncSink):
    """An AsyncSink whose `ended` is set once the item that ends the stream was delivered."""

    def __init__(self):
        self.consumer_loop = asyncio.get_running_loop()
        super().__init__(self.consumer_loop)
        self.ended = asyncio.Event()

    def put(self, item) -> None:
        super().put(item)
        if ends_stream(item):  # runs after the item's own delivery: callbacks keep their order
            self.consumer_loop.call_soon_threadsafe(self.ended.set)


def test_outputs_reach_the_sink_in_order_and_the_final_item_ends_it(loop):
    async def main():
        sink = AsyncSink()
        script = [_output("a", [1]), _output("a", [1, 2]), _output("a", [1, 2, 3], True)]
        await asyncio.wrap_future(loop.submit("a", sink, lambda: loop.worker.add("a", script)))
        return [out.outputs[0].token_ids async for out in sink.outputs()]

    # Outputs are cumulative: a consumer that falls behind may skip intermediate ones, never
    # the final one.
    tokens = _run(main())
    assert tokens[-1] == [1, 2, 3] and all(t == [1, 2, 3][: len(t)] for t in tokens)


def test_a_prefill_stream_keeps_its_first_token_and_ends_with_the_result(loop):
    async def main():
        sink = _EndSignallingSink()
        script = [_output("p", [5]), PrefillResult("p", None, "KV transfer failed: x")]
        await asyncio.wrap_future(loop.submit("p", sink, lambda: loop.worker.add("p", script)))
        await sink.ended.wait()  # both items are queued before the consumer reads
        return [item async for item in sink.outputs()]

    first, result = _run(main())
    assert first.outputs[0].token_ids == [5] and not first.finished
    assert isinstance(result, PrefillResult) and result.error.startswith("KV transfer failed")


def test_a_bad_request_raises_to_its_caller_and_leaves_no_sink(loop):
    loop.worker.add("dup", [_output("dup", [1], True)])
    future = loop.submit(
        "dup", AsyncSink(asyncio.new_event_loop()), lambda: loop.worker.add("dup", [])
    )
    with pytest.raises(ValueError, match="already in use"):
        future.result(timeout=5)


def test_a_kv_arrival_wakes_the_loop_without_polling():
    worker, inbox = ScriptedWorker(), Inbox()
    loop = EngineLoop(worker, inbox)
    try:
        worker.waiting_for_kv.add("d")
        got = threading.Event()

        class Sink:
            def put(self, item):
                got.set()

        loop.submit("d", Sink(), lambda: worker.add("d", [_output("d", [1], True)])).result(5)
        time.sleep(0.2)  # the scenario: a while with nothing but KV awaited (nothing to wait on)
        steps_while_waiting = worker.steps
        assert steps_while_waiting <= 1  # no spinning while only KV is awaited
        worker.waiting_for_kv.clear()  # (the transport thread applies the KV, then:)
        inbox.wake()
        assert got.wait(5), "a wake-up did not make the loop step"
    finally:
        loop.close(timeout_s=5)


def test_a_caller_that_left_does_not_stop_the_loop(loop):
    release, ran = threading.Event(), []
    blocker = loop.call(release.wait)  # holds the thread while the next commands are queued
    left = loop.call(lambda: ran.append("left"))
    failed = loop.call(lambda: 1 / 0)
    assert left.cancel() and failed.cancel()  # their callers went away
    release.set()
    assert blocker.result(timeout=5) is True
    assert loop.call(lambda: "still serving").result(timeout=5) == "still serving"
    assert ran == ["left"] and loop.alive


def test_a_failing_step_fails_open_requests_and_the_loop_goes_on(loop):
    async def main():
        sink = AsyncSink()
        loop.worker.fail_next_step = True
        script = [_output("f", [1]), _output("f", [1, 2], True)]
        await asyncio.wrap_future(loop.submit("f", sink, lambda: loop.worker.add("f", script)))
        with pytest.raises(RuntimeError, match="engine step failed: RuntimeError: boom"):
            async for _ in sink.outputs():
                pass

    _run(main())
    assert loop.worker.aborted == ["f"]
    assert loop.call(lambda: "alive").result(timeout=5) == "alive"


def test_abort_ends_the_stream_with_the_output_so_far(loop):
    async def main():
        sink = AsyncSink()
        loop.worker.waiting_for_kv.add("x")
        await asyncio.wrap_future(
            loop.submit("x", sink, lambda: loop.worker.add("x", [_output("x", [1], True)]))
        )
        await asyncio.wrap_future(loop.abort("x"))
        return [out async for out in sink.outputs()]

    [final] = _run(main())
    assert final.finished and loop.worker.aborted == ["x"]


def test_close_ends_open_requests_with_an_error_and_refuses_new_commands():
    worker = ScriptedWorker()
    loop = EngineLoop(worker)
    worker.waiting_for_kv.add("w")
    items = []

    class Sink:
        def put(self, item):
            items.append(item)

    loop.submit("w", Sink(), lambda: worker.add("w", [_output("w", [1], True)])).result(5)
    loop.close(timeout_s=5)
    assert not loop.alive and worker.closed
    [item] = items
    assert isinstance(item, RequestFailed) and "closed" in str(item.error)
    with pytest.raises(RuntimeError, match="closed"):
        loop.call(lambda: None).result(timeout=1)


def test_settle_skips_cancelled_futures():
    import concurrent.futures

    cancelled, waiting = concurrent.futures.Future(), concurrent.futures.Future()
    cancelled.cancel()
    settle(cancelled, 1)  # no InvalidStateError
    settle(None, 1)
    settle(waiting, error=ValueError("x"))
    assert isinstance(waiting.exception(timeout=0), ValueError)
