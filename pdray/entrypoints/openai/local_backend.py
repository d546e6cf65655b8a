"""`LocalEngineBackend`: a `ServingBackend` over one in-process `LLMEngine` (mixed role).

The engine is not thread-safe, so one thread owns it. Event loops talk to that thread through a
command queue (add, abort, stop); the thread drains the queue, runs `engine.step()` while it has
work (and blocks on the queue while idle), and leaves each request's latest cumulative output in
that request's `_Sink`, waking its consumer through the consumer's own loop. Outputs are
cumulative, so a consumer that falls behind just sees fewer, larger steps.

Lifecycle of a request: generate() -> _Add -> engine.add_request (a ValueError goes back to the
caller) -> outputs until finished -> sink dropped. Leaving generate() early (aclose, cancellation)
or abort() queues an _Abort, which frees the request's blocks in the engine thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdray.config import Role
from pdray.engine.futures import settle
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdray.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class _Sink:
    """The latest output (or an error) of one request, handed from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._event = asyncio.Event()
        self._latest: RequestOutput | None = None
        self._error: Exception | None = None

    def put(self, output: RequestOutput | None = None, error: Exception | None = None) -> None:
        """Called from the engine thread."""
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._set, output, error)

    def _set(self, output: RequestOutput | None, error: Exception | None) -> None:
        if output is not None:
            self._latest = output
        if error is not None:
            self._error = error
        self._event.set()

    async def get(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                output, self._latest = self._latest, None
                return output
            if self._error is not None:
                raise self._error
            await self._event.wait()
            self._event.clear()


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    sink: _Sink


@dataclass(slots=True)
class _Abort:
    request_id: str
    done: concurrent.futures.Future | None = None


_STOP = object()


class LocalEngineBackend:
    """Serve one `LLMEngine` from a background thread; close() (or `with`) stops it."""

    def __init__(self, engine: LLMEngine):
        if engine.config.role is not Role.MIXED:
            raise ValueError(
                f"LocalEngineBackend runs a mixed-role engine, got role={engine.config.role.value}"
            )
        self.engine = engine
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.arch.vocab_size
        # Tokenizing on the event loop while the engine thread detokenizes can trip fast
        # tokenizers ("Already borrowed"), so the HTTP side gets its own copy.
        try:
            self._tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:
            self._tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pdray-engine", daemon=True)
        self._thread.start()

    # -- ServingBackend ---------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        sink = _Sink(asyncio.get_running_loop())
        self._send(_Add(request_id, prompt, params, sink))
        finished = False
        try:
            while not finished:
                output = await sink.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._send(_Abort(request_id), missing_ok=True)

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once the engine thread has freed its blocks."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self._send(_Abort(request_id, done), missing_ok=True):
            await asyncio.wrap_future(done)

    def close(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(_STOP)
        self._thread.join(timeout_s)

    def __enter__(self) -> LocalEngineBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, command: Any, *, missing_ok: bool = False) -> bool:
        with self._lock:
            if not self._closed:
                self._commands.put(command)
                return True
        if missing_ok:
            return False
        raise RuntimeError("the LocalEngineBackend is closed")

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            commands = [] if engine.has_unfinished_requests() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is _STOP:
                    self._shutdown()
                    return
                try:
                    self._apply(command)
                except Exception:  # keep serving the other requests
                    logger.exception("engine command %r failed", command)
            if engine.has_unfinished_requests():
                self._step()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except Exception as e:
                command.sink.put(error=e)
                return
            self._sinks[command.request_id] = command.sink
            return
        try:
            output = self.engine.abort_request(command.request_id)
            sink = self._sinks.pop(command.request_id, None)
            if sink is not None and output is not None:
                output.finished = True
                sink.put(_detached(output))
        finally:
            settle(command.done)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing its %d requests", len(self._sinks))
            for request_id, sink in self._sinks.items():
                with contextlib.suppress(Exception):
                    self.engine.abort_request(request_id)
                sink.put(error=RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            self._sinks.clear()
            return
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            sink.put(_detached(output))
            if output.finished:
                del self._sinks[output.request_id]

    def _shutdown(self) -> None:
        for request_id, sink in self._sinks.items():
            with contextlib.suppress(Exception):
                self.engine.abort_request(request_id)
            sink.put(error=RuntimeError("the LocalEngineBackend was closed"))
        self._sinks.clear()
        while True:  # commands queued before the stop: resolve abort waiters
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                settle(command.done)
            elif isinstance(command, _Add):
                command.sink.put(error=RuntimeError("the LocalEngineBackend was closed"))


def _detached(output: RequestOutput) -> RequestOutput:
    """The engine keeps appending to its logprob lists; hand the loop its own copies."""
    for completion in output.outputs:
        if completion.logprobs is not None:
            completion.logprobs = list(completion.logprobs)
    return output
