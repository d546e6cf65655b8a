"""One prefill, decode or mixed instance: a pdray engine in a Ray Serve replica.

The engine is not thread-safe: one thread owns it (and its PrefillWorker or DecodeWorker) and
drains a command queue between steps. Async methods called by the router put commands on the
queue and wait on futures or per-request streams. A heartbeat task writes this instance's record
(load, free blocks, KV descriptor) to Redis with a TTL; the router picks instances from those.

Request paths:
  mixed   generate(prompt)                      -> stream of outputs
  decode  reserve(prompt) -> ticket; stream(id)  -> outputs once the KV arrived (or recomputed)
  prefill prefill(prompt, ticket)               -> returns after the hand-off (or its error)
  any     abort(id): frees the request's blocks; a stream whose client left aborts itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from pdray.config import EngineConfig, Role
from pdray.engine.futures import settle
from pdray.engine.llm_engine import LLMEngine
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class _Stream:
    """Outputs of one request, handed from the engine thread to an event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineThread:
    """Owns an engine (and its PD worker) on one thread; thread-safe entry points."""

    def __init__(self, engine: LLMEngine, worker: Any = None):
        self.engine = engine
        self.worker = worker
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._waiters: dict[str, concurrent.futures.Future] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="pdray-engine")
        self._stop = False
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    def open_stream(self, request_id: str, loop: asyncio.AbstractEventLoop) -> _Stream:
        stream = _Stream(loop)
        self.call(lambda: self._streams.__setitem__(request_id, stream))
        return stream

    def wait_prefill(self, request_id: str) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.call(lambda: self._waiters.__setitem__(request_id, future))
        return future

    def close(self) -> None:
        self._stop = True
        self._commands.put((lambda: None, None))
        self._thread.join(timeout=10)
        self.engine.close()  # the other tensor-parallel ranks, if any

    def _busy(self) -> bool:
        if self.worker is not None:
            return self.worker.has_work()
        return self.engine.has_unfinished_requests()

    def _wait_s(self) -> float:
        runnable = getattr(self.worker, "has_runnable_work", None)
        if runnable is not None and not runnable() and self._busy():
            return 0.001  # only KV in flight: yield the GIL to the transport thread
        return 0.0 if self._busy() else 0.05

    def _run(self) -> None:
        while not self._stop:
            wait_s = self._wait_s()
            block = wait_s > 0
            while True:
                try:
                    fn, future = self._commands.get(block=block, timeout=wait_s if block else None)
                except queue.Empty:
                    break
                block = False
                try:
                    result = fn()
                except Exception as e:
                    settle(future, error=e)
                else:
                    settle(future, result)
            if self._busy():
                self._step()

    def _step(self) -> None:
        poll = getattr(self.worker, "poll_transfers", None)
        if poll is not None:  # deliver admissions (first tokens) before running a decode step
            for output in poll():
                self._deliver(output)
        try:
            results = (
                self.engine.step() if poll is not None else (self.worker or self.engine).step()
            )
        except Exception as e:  # fail every open request rather than hang them
            logger.exception("engine step failed")
            for stream in self._streams.values():
                stream.put(e)
            self._streams.clear()
            return
        for result in results:
            if isinstance(result, RequestOutput):
                self._deliver(result)
            else:  # PrefillResult
                waiter = self._waiters.pop(result.request_id, None)
                settle(waiter, result.error)
        for event in getattr(self.worker, "events", [])[:]:
            self.worker.events.remove(event)
            stream = self._streams.pop(event.request_id, None)
            if stream is not None:
                stream.put(RuntimeError(f"{event.kind}: {event.reason}"))

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        stream.put(output)
        if output.finished:
            del self._streams[output.request_id]


def make_engine_thread(role: Role, args, replica_id: str) -> tuple[EngineThread, Any]:
    """Build the engine (and PD worker) of one replica; returns it and the worker."""
    role_args = getattr(args, role.value)
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        role=role,
        gpu_memory_utilization=role_args.gpu_memory_utilization,
        tensor_parallel_size=role_args.tensor_parallel_size,
        **role_args.engine_args,
    )
    engine = LLMEngine(config)
    worker = None
    if role is not Role.MIXED:
        from pdray.disagg.decode import DecodeWorker
        from pdray.disagg.prefill import PrefillWorker
        from pdray.kv_transfer import make_transport

        kind = resolve_transport(args.transport, engine)
        options = (
            {"net_devices": args.ucx_net_devices} if kind == "ucx" and args.ucx_net_devices else {}
        )
        transport = make_transport(kind, **options)
        if role is Role.PREFILL:
            worker = PrefillWorker(engine, transport)
        else:
            worker = DecodeWorker(
                engine,
                transport,
                engine_id=replica_id,
                lease_s=args.lease_s,
                policy=args.failure_policy,
            )
    return EngineThread(engine, worker), worker


def resolve_transport(transport: str, engine: LLMEngine) -> str:
    if transport != "auto":
        return transport
    return "cuda_ipc" if engine.runner.device.type == "cuda" else "ucx"


async def stream_outputs(
    thread: EngineThread, request_id: str, stream: _Stream
) -> AsyncIterator[RequestOutput]:
    """Yield a request's outputs; if the consumer leaves early, abort it in the engine."""
    finished = False
    try:
        while not finished:
            item = await stream.queue.get()
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
    finally:
        if not finished:
            thread.call(lambda: _abort(thread, request_id))


def _abort(thread: EngineThread, request_id: str) -> None:
    thread._streams.pop(request_id, None)
    if thread.worker is not None:
        thread.worker.abort(request_id)
    else:
        thread.engine.abort_request(request_id)


def params_from(params: dict | SamplingParams) -> SamplingParams:
    return params if isinstance(params, SamplingParams) else SamplingParams(**params)
