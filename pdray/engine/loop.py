"""`EngineLoop`: one thread that owns a role worker (and its engine) and runs it as events arrive.

The engine is not thread-safe; every call into it runs on the loop's thread. Other threads and
event loops talk to it through the loop's `Inbox`: commands (`call`, `submit`, `abort`) and bare
wake-ups (a KV message arrived; the transport thread calls `Inbox.wake`). The thread

  blocks on the inbox      while the worker has nothing to do (no timeout: idle is not a wait on
                           a peer), or until the worker's next deadline (a lease) while it only
                           waits for KV -- no poll interval sits on the path of a token;
  drains every command     that arrived, in order;
  steps the worker once    if it has work: outputs go to each request's `Sink` as they are
                           emitted, and a sink is dropped after the item that ends its stream.

Request lifecycle here: submit(request_id, sink, command) registers the sink and runs the command
(a ValueError goes back to the caller and the sink is dropped) -> outputs -> the final item
(pdray/engine/role_worker.py) -> sink dropped. abort(request_id) frees the request's blocks and
ends its sink with the output so far (finish reason "abort"). If a step raises, every open
request ends with that error and the loop keeps serving; close() ends the open requests with an
error, stops the thread and closes the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pdray.engine.futures import settle
from pdray.engine.role_worker import RequestFailed, RoleWorker, StreamItem, ends_stream
from pdray.outputs import RequestOutput

logger = logging.getLogger(__name__)

_STOP = object()


class Sink(Protocol):
    def put(self, item: StreamItem) -> None:
        """Called from the loop's thread; must not block."""
        ...


class Inbox:
    """Commands for a loop's thread, and wake-ups that carry none."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, command: Any) -> None:
        self._queue.put(command)

    def wake(self) -> None:
        """Make the loop step its worker soon (any thread)."""
        self._queue.put(None)

    def take(self, timeout_s: float | None) -> list[Any]:
        """Commands (wake-ups dropped), waiting up to timeout_s for the first (None: until one
        arrives; 0: not at all)."""
        items = []
        try:
            items.append(self._queue.get(timeout=timeout_s) if timeout_s != 0 else None)
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return [item for item in items if item is not None]


_SLOW_S = 5.0  # a command that waited, or a step that ran, longer than this is logged


class _Command:
    __slots__ = ("fn", "future", "queued_s")

    def __init__(self, fn: Callable[[], Any], future: concurrent.futures.Future | None):
        self.fn, self.future, self.queued_s = fn, future, time.monotonic()


class EngineLoop:
    """Runs `worker` on its own thread; thread-safe entry points. `inbox`: pass the one whose
    `wake` the worker's KV transport calls (else a new one)."""

    def __init__(self, worker: RoleWorker, inbox: Inbox | None = None, name: str = "pdray-engine"):
        self.worker = worker
        self.inbox = inbox or Inbox()
        self._sinks: dict[str, Sink] = {}  # loop thread only
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    @property
    def engine(self):
        return self.worker.engine

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- any thread ------------------------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn() on the loop's thread; its result or exception comes back in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError("the engine loop is closed"))
                return future
            self.inbox.put(_Command(fn, future))
        return future

    def submit(
        self, request_id: str, sink: Sink, command: Callable[[], Any]
    ) -> concurrent.futures.Future:
        """Register the request's sink, then run command() (which adds the request to the
        worker); if it raises, the sink is dropped and the error goes to the future."""

        def run() -> Any:
            self._sinks[request_id] = sink
            try:
                return command()
            except BaseException:
                self._sinks.pop(request_id, None)
                raise

        return self.call(run)

    def abort(self, request_id: str) -> concurrent.futures.Future:
        """Stop a request and free its blocks; the future is done once they are free."""
        return self.call(lambda: self._abort(request_id))

    async def stream(self, request_id: str, sink: AsyncSink) -> AsyncIterator[StreamItem]:
        """The request's items from `sink` up to the final one (a RequestFailed raises its
        error); a consumer that leaves early aborts the request."""
        finished = False
        try:
            async for item in sink.outputs():
                finished = ends_stream(item)
                yield item
        except Exception:  # a RequestFailed: the request already ended in the engine
            finished = True
            raise
        finally:
            if not finished:
                self.abort(request_id)

    def close(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.inbox.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("the engine loop did not stop within %g s; closing its worker", timeout_s)
        self.worker.close()

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        worker = self.worker
        while True:
            commands = self.inbox.take(self._wait_s())
            for command in commands:
                if command is _STOP:
                    self._shutdown()
                    return
                waited_s = time.monotonic() - command.queued_s
                if waited_s > _SLOW_S:
                    logger.warning("engine loop: a command waited %.1f s for the loop", waited_s)
                try:
                    result = command.fn()
                except Exception as e:
                    settle(command.future, error=e)
                else:
                    settle(command.future, result)
            if worker.has_work():
                self._step()

    def _wait_s(self) -> float | None:
        worker = self.worker
        if worker.has_runnable_work():
            return 0
        if not worker.has_work():
            return None
        deadline = worker.next_deadline_s()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _step(self) -> None:
        start_s = time.monotonic()
        try:
            self.worker.step(self._emit)
            if time.monotonic() - start_s > _SLOW_S:
                logger.warning("engine loop: a step took %.1f s", time.monotonic() - start_s)
        except Exception as e:  # fail every open request rather than hang them
            logger.exception("engine step failed; failing its %d requests", len(self._sinks))
            error = RuntimeError(f"engine step failed: {type(e).__name__}: {e}")
            for request_id in list(self._sinks):
                with contextlib.suppress(Exception):
                    self.worker.abort(request_id)
                self._sinks.pop(request_id).put(RequestFailed(request_id, error))

    def _emit(self, request_id: str, item: StreamItem) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        sink.put(_detached(item))
        if ends_stream(item):
            del self._sinks[request_id]

    def _abort(self, request_id: str) -> None:
        output = self.worker.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None and isinstance(output, RequestOutput):
            output.finished = True
            sink.put(_detached(output))

    def _shutdown(self) -> None:
        error = RuntimeError("the engine loop was closed")
        for request_id, sink in self._sinks.items():
            with contextlib.suppress(Exception):
                self.worker.abort(request_id)
            sink.put(RequestFailed(request_id, error))
        self._sinks.clear()
        for command in self.inbox.take(0):  # queued after the stop: their callers get an answer
            if isinstance(command, _Command):
                settle(command.future, error=error)


def _detached(item: StreamItem) -> StreamItem:
    """The engine keeps appending to its lists; hand other threads their own copies."""
    output = item.output if not isinstance(item, RequestOutput) else item
    if isinstance(output, RequestOutput):
        for completion in output.outputs:
            completion.token_ids = list(completion.token_ids)
            if completion.logprobs is not None:
                completion.logprobs = list(completion.logprobs)
    return item


class AsyncSink:
    """A request's stream on an asyncio event loop. Outputs are cumulative, so a newer output
    replaces one the consumer has not read yet; the final item is always delivered."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._latest: RequestOutput | None = None
        self._final: StreamItem | None = None

    def put(self, item: StreamItem) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._set, item)

    def deliver(self, item: StreamItem) -> None:
        """`put` from the sink's own event loop (no hop through `call_soon_threadsafe`)."""
        self._set(item)

    def _set(self, item: StreamItem) -> None:
        if ends_stream(item):
            self._final = item
        else:
            self._latest = item
        self._event.set()

    async def get(self) -> StreamItem:
        """The next item; the final one last (raises nothing: errors are RequestFailed)."""
        while True:
            if self._latest is not None:
                item, self._latest = self._latest, None
                return item
            if self._final is not None:
                return self._final
            await self._event.wait()
            self._event.clear()

    async def outputs(self):
        """The request's RequestOutputs until the final one; RequestFailed raises its error.
        A PrefillResult ends the iteration (prefill streams)."""
        while True:
            item = await self.get()
            if isinstance(item, RequestFailed):
                raise item.error
            if isinstance(item, RequestOutput):
                yield item
                if item.finished:
                    return
            else:
                yield item
                return
