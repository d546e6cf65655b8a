"""Drives a PrefillWorker and a DecodeWorker like a router would: both in this process, or one
of them in a child process that a test can kill (`WorkerProcess`)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import time

from pdray.config import EngineConfig
from pdray.disagg.decode import DecodeWorker
from pdray.disagg.prefill import PrefillWorker
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import RequestFailed
from pdray.kv_transfer.local import LocalTransport

_ids = itertools.count()


def make_engine(path, role: str, **kwargs) -> LLMEngine:
    kwargs = {"device": "cpu", "dtype": "float32", **kwargs}
    return LLMEngine(EngineConfig(model=str(path), role=role, **kwargs))


def make_pair(path, transport_factory=LocalTransport, *, prefill_kwargs=None, decode_kwargs=None,
              **worker_kwargs):  # fmt: skip
    prefill = PrefillWorker(
        make_engine(path, "prefill", **(prefill_kwargs or {})), transport_factory()
    )
    decode = DecodeWorker(
        make_engine(path, "decode", **(decode_kwargs or {})),
        transport_factory(),
        engine_id=f"decode-{next(_ids)}",
        **worker_kwargs,
    )
    return prefill, decode


def run(
    prefill: PrefillWorker,
    decode: DecodeWorker,
    prompts,
    params,
    *,
    max_steps=10_000,
    failures: dict | None = None,
    **reserve_kw,
):
    """Reserve on decode, prefill with the ticket, step both until done; final outputs in order.
    Requests that failed on decode (RequestFailed) go to `failures` (request id -> error);
    AssertionError if some have not ended (or decode still has work) after max_steps."""
    ids = [f"req-{next(_ids)}" for _ in prompts]
    for request_id, prompt in zip(ids, prompts, strict=True):
        ticket = decode.reserve(request_id, prompt, params, **reserve_kw)
        assert ticket is not None
        prefill.submit(request_id, prompt, params, ticket)
    final = {}
    failures = {} if failures is None else failures
    for _ in range(max_steps):
        prefill.step()
        for item in decode.step():
            if isinstance(item, RequestFailed):
                failures[item.request_id] = item.error
            elif item.finished:
                final[item.request_id] = item
        if len(final) + len(failures) == len(ids) and not decode.has_work():
            break
    else:
        unfinished = [i for i in ids if i not in final and i not in failures]
        raise AssertionError(
            f"after {max_steps} steps: unfinished {unfinished}, decode has work: "
            f"{decode.has_work()}"
        )
    return [final.get(request_id) for request_id in ids], ids


def wait_until(condition, timeout_s: float, failure: str, poll_s: float = 0.005):
    """condition()'s first truthy value, called every poll_s (0: again at once, for a condition
    that steps an engine); AssertionError "{failure} within {timeout_s} s" after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{failure} within {timeout_s} s"
        if poll_s:
            time.sleep(poll_s)
    return value


def poll_until_done(receiver, timeout_s: float = 10.0) -> list:
    """The receiver's finished tickets (its first non-empty `poll`), or AssertionError after
    timeout_s."""
    return wait_until(receiver.poll, timeout_s, "the ticket did not complete")


def assert_baseline(*engines: LLMEngine) -> None:
    for engine in engines:
        assert engine.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.requests


# -- one worker in a child process, over UCX on loopback ------------------------------------------


def _serve_worker(
    role: str, path: str, engine_kwargs: dict, worker_kwargs: dict, transport: str, conn
) -> None:
    """Child process: one worker whose methods the parent calls over a pipe. Nothing runs between
    calls (the parent steps it), so the parent controls exactly how far a request gets."""
    from pdray.kv_transfer import make_transport

    try:
        engine = make_engine(path, role, **engine_kwargs)
        options = {"host": "127.0.0.1"}
        transport = make_transport(transport, **options)
        if role == "prefill":
            worker = PrefillWorker(engine, transport, **worker_kwargs)
        else:
            worker = DecodeWorker(engine, transport, **worker_kwargs)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", getattr(worker, "descriptor", None)))
    while True:
        method, args = conn.recv()
        if method == "close":
            worker.close()
            return
        try:
            if method == "blocks":
                result = (
                    engine.num_free_blocks,
                    engine.block_manager.num_blocks,
                    len(engine.requests),
                )
            elif method == "follower_pids":  # the engine's other tensor-parallel ranks
                result = [f.pid for f in engine.runner.tp_group.followers]
            elif method == "transfer_metrics":
                kv = getattr(worker, "receiver", None) or worker.sender
                result = kv.metrics.as_dict()
            else:
                result = getattr(worker, method)(*args)
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class WorkerProcess:
    """A PrefillWorker or DecodeWorker (UCX on 127.0.0.1, or `transport`) in a spawned child.

    `start()` returns at once; `wait_ready()` waits for the engine. `call(method, *args)` runs a
    worker method in the child ("step", "reserve", "submit", ...; "blocks" gives the engine's
    (free blocks, total blocks, live requests), "transfer_metrics" its rank 0's KV counters,
    "follower_pids" the processes of its other tensor-parallel ranks).
    `kill()` sends SIGKILL."""

    def __init__(
        self,
        role: str,
        path,
        engine_kwargs: dict,
        worker_kwargs: dict | None = None,
        transport: str = "ucx",
    ):
        ctx = mp.get_context("spawn")
        self.role = role
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve_worker,
            args=(role, str(path), engine_kwargs, worker_kwargs or {}, transport, child_conn),
            daemon=False,  # a daemonic process cannot start tensor-parallel ranks; close() stops it
        )
        self.descriptor = None

    def start(self) -> WorkerProcess:
        self.process.start()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> WorkerProcess:
        self.descriptor = self._reply(timeout_s)
        return self

    def call(self, method: str, *args, timeout_s: float = 30.0):
        self.conn.send((method, args))
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"{self.role} child gave no answer within {timeout_s} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"{self.role} child exited ({self.process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"{self.role} child: {value}")
        return value

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)
        assert self.process.exitcode == -signal.SIGKILL

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(("close", ()))
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
