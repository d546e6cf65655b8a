"""One prefill engine and one decode engine in two child processes, driven from this one.

The offline equivalent of a 1P1D deployment. Per request the driver reserves blocks on decode
(which answers with a Ticket), submits the prompt with the ticket to prefill, and collects the
decode engine's outputs. Commands and outputs travel over multiprocessing pipes; the KV travels
over the chosen transport (`ucx` or `cuda_ipc`; `local` runs both engines in this process).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing as mp
import time
from collections.abc import Sequence

from pdray.config import EngineConfig
from pdray.disagg.decode import DecodeWorker
from pdray.disagg.prefill import PrefillWorker
from pdray.engine.llm_engine import LLMEngine
from pdray.kv_transfer import make_transport
from pdray.kv_transfer.base import FailurePolicy, Ticket, TransportKind
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

_POLL_S = 0.002


def _make_worker(role: str, model: str, transport: str, engine_args: dict, name: str):
    engine = LLMEngine(EngineConfig(model=model, role=role, **engine_args))
    kind = make_transport(transport)
    if role == "prefill":
        return PrefillWorker(engine, kind)
    return DecodeWorker(engine, kind, engine_id=name, policy=FailurePolicy.RECOMPUTE)


def _serve(role: str, model: str, transport: str, engine_args: dict, name: str, conn) -> None:
    """Child process: run one worker, answer commands, stream outputs back."""
    try:
        worker = _make_worker(role, model, transport, engine_args, name)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", getattr(worker, "descriptor", None)))
    while True:
        while conn.poll(_idle_wait_s(worker)):
            command, args = conn.recv()
            if command == "close":
                worker.close()
                return
            try:
                reply = _handle(worker, command, args)
            except Exception as e:
                reply = ("error", f"{type(e).__name__}: {e}", args[0])
            if reply is not None:
                conn.send(reply)
        if worker.has_work():
            for result in worker.step():
                conn.send(("output", result))


def _idle_wait_s(worker) -> float:
    """How long to wait for a command: not at all with work to run, briefly while KV is in
    flight (a spinning loop would starve the transport thread of the GIL), else longer."""
    runnable = getattr(worker, "has_runnable_work", worker.has_work)
    if runnable():
        return 0.0
    return 0.001 if worker.has_work() else 0.05


def _handle(worker, command: str, args: tuple):
    if command == "reserve":
        request_id, prompt, params = args
        ticket = worker.reserve(request_id, prompt, params)
        return ("ticket", request_id, None if ticket is None else ticket.model_dump())
    if command == "submit":
        request_id, prompt, params, ticket = args
        worker.submit(request_id, prompt, params, Ticket(**ticket))
        return None
    if command == "abort":
        worker.abort(args[0])
        return None
    raise ValueError(f"unknown command {command!r}")


class _Child:
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
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{role} engine failed to start: {payload}")
        self.descriptor = payload

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("close", ()))
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


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

    def generate(
        self, prompts: Sequence, params: SamplingParams, timeout_s: float = 600.0
    ) -> list[RequestOutput]:
        try:
            return self._generate(prompts, params, timeout_s)
        except (EOFError, OSError) as e:  # a pipe to an engine process broke
            dead = [
                f"the {c.role} engine process exited (code {c.process.exitcode})"
                for c in (self.prefill, self.decode)
                if not c.process.is_alive()
            ]
            raise RuntimeError("; ".join(dead) or f"lost an engine process: {e}") from e

    def _generate(self, prompts: Sequence, params: SamplingParams, timeout_s: float):
        ids = [f"disagg-{next(self._ids)}" for _ in prompts]
        queued = dict(zip(ids, prompts, strict=True))
        final: dict[str, RequestOutput] = {}
        deadline = time.monotonic() + timeout_s
        for request_id, prompt in queued.items():
            self.decode.conn.send(("reserve", (request_id, prompt, params)))
        while len(final) < len(ids):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(ids) - len(final)} requests unfinished after {timeout_s} s"
                )
            self._pump_decode(queued, params, final)
            self._pump_prefill()
        return [final[request_id] for request_id in ids]

    def _pump_decode(self, queued: dict, params: SamplingParams, final: dict) -> None:
        while self.decode.conn.poll(_POLL_S):
            message = self.decode.conn.recv()
            if message[0] == "ticket":
                _, request_id, ticket = message
                if ticket is None:  # decode cache full right now: ask again shortly
                    self.decode.conn.send(("reserve", (request_id, queued[request_id], params)))
                else:
                    self.prefill.conn.send(
                        ("submit", (request_id, queued[request_id], params, ticket))
                    )
            elif message[0] == "output" and message[1].finished:
                final[message[1].request_id] = message[1]
            elif message[0] == "error":
                raise RuntimeError(f"decode engine: {message[1]}")

    def _pump_prefill(self) -> None:
        while self.prefill.conn.poll(0):
            message = self.prefill.conn.recv()
            if message[0] == "error":
                raise RuntimeError(f"prefill engine: {message[1]}")
            # ("output", PrefillResult): a failed hand-off is recovered by the decode side's policy.

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
        self.prefill = _make_worker("prefill", model, "local", engine_args, "prefill-local")
        self.decode = _make_worker(
            "decode", model, "local", engine_args, f"decode-local-{id(self)}"
        )

    def generate(self, prompts: Sequence, params: SamplingParams) -> list[RequestOutput]:
        ids = [f"local-{next(self._ids)}" for _ in prompts]
        waiting = list(zip(ids, prompts, strict=True))
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            still_waiting = []
            for request_id, prompt in waiting:
                ticket = self.decode.reserve(request_id, prompt, params)
                if ticket is None:
                    still_waiting.append((request_id, prompt))
                else:
                    self.prefill.submit(request_id, prompt, params, ticket)
            waiting = still_waiting
            self.prefill.step()
            for out in self.decode.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[request_id] for request_id in ids]

    def close(self) -> None:
        self.decode.close()
        self.prefill.close()

    def __enter__(self) -> LocalDisaggregatedLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
