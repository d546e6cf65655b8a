"""A prefill engine and a decode engine driven from this process: the offline 1P1D deployment.

Each engine runs on an `EngineLoop` (pdray/engine/loop.py), the loop a Serve replica uses: in a
child process each (`DisaggregatedLLM`, KV over `ucx` or `cuda_ipc`) or both in this process
(`LocalDisaggregatedLLM`, the `local` transport). The driver speaks the same protocol as the
Serve router, as messages:

  driver -> decode    ("reserve", id, prompt, params)      -> ("ticket", id, ticket | None)
  driver -> prefill   ("submit", id, prompt, params, ticket)  (KV flows prefill -> decode)
  engine -> driver    ("item", id, RequestOutput | PrefillResult | RequestFailed)
                      ("error", id, message)  a command failed
  driver -> either    ("abort", id), ("close",)

A reservation refused for lack of room is asked again when a decode request finishes, so nothing
polls. Every wait of the driver has a deadline (`timeout_s`); a child that exits is reported with
its exit code.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable, Sequence

from pdray.config import EngineConfig
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.loop import EngineLoop, Inbox
from pdray.engine.role_worker import RequestFailed, StreamItem
from pdray.kv_transfer import make_transport
from pdray.kv_transfer.base import FailurePolicy, Ticket, TransportKind
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0  # loading a large checkpoint


def _make_loop(role: str, model: str, transport: str, engine_args: dict, name: str) -> EngineLoop:
    from pdray.disagg.decode import DecodeWorker
    from pdray.disagg.prefill import PrefillWorker

    engine = LLMEngine(EngineConfig(model=model, role=role, **engine_args))
    inbox = Inbox()
    kind = make_transport(transport)
    if role == "prefill":
        worker = PrefillWorker(engine, kind)
    else:
        worker = DecodeWorker(
            engine, kind, engine_id=name, policy=FailurePolicy.RECOMPUTE, wake=inbox.wake
        )
    return EngineLoop(worker, inbox, name=f"pdray-{role}")


class _Sink:
    def __init__(self, reply: Callable[[tuple], None], request_id: str):
        self.reply, self.request_id = reply, request_id

    def put(self, item: StreamItem) -> None:
        self.reply(("item", self.request_id, item))


def _handle(loop: EngineLoop, message: tuple, reply: Callable[[tuple], None]) -> None:
    """Run one driver command on an engine loop; answers go to `reply` (from any thread)."""
    command, request_id, *args = message
    if command == "abort":
        loop.abort(request_id)
        return
    worker, sink = loop.worker, _Sink(reply, request_id)
    if command == "reserve":
        future = loop.submit(request_id, sink, lambda: worker.reserve(request_id, *args))
    elif command == "submit":
        prompt, params, ticket = args
        future = loop.submit(
            request_id, sink, lambda: worker.submit(request_id, prompt, params, Ticket(**ticket))
        )
    else:
        raise ValueError(f"unknown command {command!r}")

    def answer(done) -> None:
        error = done.exception()
        if error is not None:
            reply(("error", request_id, f"{type(error).__name__}: {error}"))
        elif command == "reserve":
            ticket = done.result()
            if ticket is None:
                loop.abort(request_id)  # drops the sink
            reply(("ticket", request_id, None if ticket is None else ticket.model_dump()))

    future.add_done_callback(answer)


def _serve(role: str, model: str, transport: str, engine_args: dict, name: str, conn) -> None:
    """Child process: run one engine loop, answer the driver's commands."""
    try:
        loop = _make_loop(role, model, transport, engine_args, name)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    lock = threading.Lock()

    def reply(message: tuple) -> None:
        with lock, contextlib.suppress(OSError):
            conn.send(message)

    reply(("ready", getattr(loop.worker, "descriptor", None)))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the driver is gone
                return
            if message[0] == "close":
                return
            _handle(loop, message, reply)
    finally:
        loop.close()


class _Child:
    """One engine in a spawned child process; its messages go to `inbox` as (role, message)."""

    def __init__(self, role: str, model: str, transport: str, engine_args: dict, name: str):
        self.role = role
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve,
            args=(role, model, transport, engine_args, name, child_conn),
            daemon=False,  # a daemonic process cannot start its tensor-parallel ranks
        )
        self.process.start()
        atexit.register(self.close)  # not daemonic: stop it at exit if the caller did not
        if not self.conn.poll(_START_TIMEOUT_S):
            self.close()
            raise TimeoutError(f"the {role} engine did not start within {_START_TIMEOUT_S:g} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(self.exit_message()) from None
        if kind == "failed":
            self.close()
            raise RuntimeError(f"{role} engine failed to start: {payload}")
        self.descriptor = payload
        self._lock = threading.Lock()

    def exit_message(self) -> str:
        self.process.join(5)
        return f"the {self.role} engine process exited (code {self.process.exitcode})"

    def start_reading(self, inbox: queue.Queue) -> None:
        threading.Thread(target=self._read, args=(inbox,), daemon=True,
                         name=f"pdray-{self.role}-pipe").start()  # fmt: skip

    def _read(self, inbox: queue.Queue) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                inbox.put((self.role, ("exited", "", self.exit_message())))
                return
            inbox.put((self.role, message))

    def send(self, message: tuple) -> None:
        with self._lock:
            self.conn.send(message)

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("close",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


def _drive(
    prompts: Sequence,
    params: SamplingParams,
    ids: list[str],
    send: Callable[[str, tuple], None],
    inbox: queue.Queue,
    timeout_s: float,
) -> list[RequestOutput]:
    """The router's protocol for a batch of requests; final outputs in order."""
    prompt_of = dict(zip(ids, prompts, strict=True))
    final: dict[str, RequestOutput] = {}
    no_room: list[str] = []  # reservations refused for lack of room, asked again on a finish
    running: set[str] = set()
    deadline = time.monotonic() + timeout_s
    for request_id in ids:
        send("decode", ("reserve", request_id, prompt_of[request_id], params))
    while len(final) < len(ids):
        try:
            role, (kind, request_id, value) = inbox.get(timeout=deadline - time.monotonic())
        except (queue.Empty, ValueError):
            raise TimeoutError(
                f"{len(ids) - len(final)} of {len(ids)} requests unfinished after {timeout_s} s"
            ) from None
        if kind == "exited":
            raise RuntimeError(value)
        if request_id not in prompt_of:  # left over from an earlier, failed batch
            continue
        if kind == "error":
            raise RuntimeError(f"{role} engine: request {request_id}: {value}")
        if kind == "ticket":
            if value is None:
                if not running:
                    raise RuntimeError(
                        f"request {request_id} does not fit the decode engine's KV cache"
                    )
                no_room.append(request_id)
            else:
                running.add(request_id)
                send("prefill", ("submit", request_id, prompt_of[request_id], params, value))
        elif role == "decode" and isinstance(value, RequestFailed):
            raise RuntimeError(f"decode engine: request {request_id}: {value.error}")
        elif role == "decode" and isinstance(value, RequestOutput) and value.finished:
            final[request_id] = value
            running.discard(request_id)
            for waiting in no_room:
                send("decode", ("reserve", waiting, prompt_of[waiting], params))
            no_room.clear()
        # prefill items: the first token (decode's output repeats it) and the hand-off's end
        # (a failed one is recovered by decode's policy)
    return [final[request_id] for request_id in ids]


class DisaggregatedLLM:
    """`generate` like `pdray.LLM`, with prefill and decode in separate processes.

    `engine_args` apply to both engines; `prefill_args` / `decode_args` add to or override them
    for one side, e.g. `prefill_args={"tensor_parallel_size": 2}`."""

    def __init__(
        self,
        model: str,
        transport: TransportKind | str = "ucx",
        *,
        prefill_args: dict | None = None,
        decode_args: dict | None = None,
        **engine_args,
    ):
        self.transport = TransportKind(transport)
        if self.transport is TransportKind.LOCAL:
            raise ValueError("the local transport needs both engines in one process")
        self._ids = itertools.count()
        kind = self.transport.value
        self.prefill = _Child(
            "prefill", model, kind, {**engine_args, **(prefill_args or {})}, "prefill-0"
        )
        try:
            self.decode = _Child(
                "decode", model, kind, {**engine_args, **(decode_args or {})}, "decode-0"
            )
        except Exception:
            self.prefill.close()
            raise
        self._inbox: queue.Queue = queue.Queue()
        self.prefill.start_reading(self._inbox)
        self.decode.start_reading(self._inbox)

    def generate(
        self, prompts: Sequence, params: SamplingParams, timeout_s: float = 600.0
    ) -> list[RequestOutput]:
        ids = [f"disagg-{next(self._ids)}" for _ in prompts]
        children = {"prefill": self.prefill, "decode": self.decode}
        try:
            return _drive(
                prompts, params, ids, lambda role, m: children[role].send(m), self._inbox, timeout_s
            )
        except (EOFError, OSError) as e:  # a pipe to an engine process broke
            raise RuntimeError(f"lost an engine process: {e}") from e
        except BaseException:
            for request_id in ids:  # leave nothing running in the engines
                for child in children.values():
                    with contextlib.suppress(OSError):
                        child.send(("abort", request_id))
            raise

    def close(self) -> None:
        self.prefill.close()
        self.decode.close()

    def __enter__(self) -> DisaggregatedLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalDisaggregatedLLM:
    """Both engines in this process over the `local` transport (tests, demos without UCX)."""

    def __init__(self, model: str, **engine_args):
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self.loops = {
            "prefill": _make_loop("prefill", model, "local", engine_args, "prefill-local"),
        }
        try:
            name = f"decode-local-{id(self)}"
            self.loops["decode"] = _make_loop("decode", model, "local", engine_args, name)
        except BaseException:
            self.loops["prefill"].close()
            raise

    @property
    def prefill(self):
        return self.loops["prefill"].worker

    @property
    def decode(self):
        return self.loops["decode"].worker

    def generate(
        self, prompts: Sequence, params: SamplingParams, timeout_s: float = 600.0
    ) -> list[RequestOutput]:
        ids = [f"local-{next(self._ids)}" for _ in prompts]

        def send(role: str, message: tuple) -> None:
            _handle(self.loops[role], message, lambda reply: self._inbox.put((role, reply)))

        try:
            return _drive(prompts, params, ids, send, self._inbox, timeout_s)
        except BaseException:
            for request_id in ids:  # leave nothing running in the engines
                for loop in self.loops.values():
                    loop.abort(request_id)
            raise

    def close(self) -> None:
        self.loops["decode"].close()
        self.loops["prefill"].close()

    def __enter__(self) -> LocalDisaggregatedLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
