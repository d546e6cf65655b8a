"""PDReplica.reserve_stream (decode's `reserve` and `stream` in one call), on a real EngineLoop
driving a scripted decode worker (no Serve): the ticket comes first, then the request's outputs;
no room is a None and nothing else; a caller that leaves after the ticket aborts the request, so
its blocks do not wait for the reaper."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)
from pdray.deployments.caller_deadlines import CallerDeadlines  # noqa: E402
from pdray.deployments.replica import PDReplica  # noqa: E402

from pdray.engine.loop import EngineLoop  # noqa: E402
from pdray.outputs import CompletionOutput, RequestOutput  # noqa: E402


class _Ticket:
    def __init__(self, request_id: str):
        self.request_id = request_id

    def model_dump(self, mode: str) -> dict:
        return {"request_id": self.request_id}


class _ScriptedDecode:
    """A decode worker: `reserve` holds the request when `room`, and one step admits it and
    finishes it with tokens [7, 8]."""

    engine = None

    def __init__(self, room: bool):
        self.room = room
        self.held: set[str] = set()
        self.aborted: list[str] = []

    def reserve(self, request_id, prompt, params):
        if not self.room:
            return None
        self.held.add(request_id)
        return _Ticket(request_id)

    def has_work(self) -> bool:
        return bool(self.held)

    def has_runnable_work(self) -> bool:
        return bool(self.held)

    def next_deadline_s(self) -> float | None:
        return None

    def step(self, emit) -> None:
        for request_id in list(self.held):
            self.held.discard(request_id)
            done = CompletionOutput(index=0, text="ab", token_ids=[7, 8], finish_reason="length")
            emit(request_id, RequestOutput(request_id, "", [1, 2], [done], finished=True))

    def abort(self, request_id: str):
        self.aborted.append(request_id)
        self.held.discard(request_id)
        return None

    def close(self) -> None:
        pass


def _replica(worker: _ScriptedDecode, hold: bool = False) -> PDReplica:
    replica = PDReplica.__new__(PDReplica)  # no Serve context: only what reserve_stream uses
    replica.replica_id = "d0"
    if hold:  # the loop admits nothing: the request stays reserved
        worker.has_runnable_work = lambda: False
        worker.has_work = lambda: False
    replica.worker = worker
    replica.loop = EngineLoop(worker)
    replica.late = []  # what the reaper would abort once every deadline has passed
    replica._deadlines = CallerDeadlines(60.0, replica.late.append, clock=lambda: replica.now_s)
    replica.now_s = 0.0
    return replica


def _reaped(replica: PDReplica) -> list[str]:
    replica.now_s = 1e9
    return replica._deadlines.reap()


def _wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _every_item(replica) -> list:
    """Everything `reserve_stream` yields for request "r", read to the end."""

    async def main():
        return [item async for item in replica.reserve_stream("r", [1, 2], {}, replica_id="d0")]

    return asyncio.run(main())


def test_ticket_then_outputs_in_one_call():
    worker = _ScriptedDecode(room=True)
    replica = _replica(worker)

    try:
        ticket, *outputs = _every_item(replica)
        assert ticket == {"request_id": "r"}
        assert [o.outputs[0].token_ids for o in outputs] == [[7, 8]] and outputs[-1].finished
        assert worker.aborted == [] and _reaped(replica) == []
    finally:
        replica.loop.close()


def test_no_room_is_none_and_the_request_is_dropped():
    worker = _ScriptedDecode(room=False)
    replica = _replica(worker)

    try:
        assert _every_item(replica) == [None]
        assert worker.aborted == ["r"]
    finally:
        replica.loop.close()


@pytest.mark.parametrize("leave", ["aclose", "cancel"])
def test_a_caller_that_leaves_after_the_ticket_aborts_the_request(leave):
    worker = _ScriptedDecode(room=True)
    replica = _replica(worker, hold=True)

    async def main():
        items = replica.reserve_stream("r", [1, 2], {}, replica_id="d0")
        assert await anext(items) == {"request_id": "r"}
        if leave == "aclose":
            await items.aclose()
        else:  # Serve cancels the task that iterates a streaming call
            task = asyncio.ensure_future(anext(items))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await items.aclose()

    try:
        asyncio.run(main())
        _wait_until(lambda: worker.aborted == ["r"])
        assert _reaped(replica) == []  # nothing left for the reaper
    finally:
        replica.loop.close()


def test_a_call_for_another_replica_is_refused():
    replica = _replica(_ScriptedDecode(room=True))

    async def main():
        return [item async for item in replica.reserve_stream("r", [1], {}, replica_id="d1")]

    try:
        with pytest.raises(RuntimeError, match="no longer serving"):
            asyncio.run(main())
    finally:
        replica.loop.close()
