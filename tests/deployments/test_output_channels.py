"""Output channels (deployments/output_channels.py): the replica's ChannelHub and the router's
ChannelClient, and PDReplica's `reserve` and `channel` on a real EngineLoop driving a scripted
decode worker (no Serve). One stream carries many requests' outputs, a batch per wake-up, the
latest (cumulative) output of each and its prompt once; no room is a None and nothing else; a
channel its router closes aborts the requests left on it; a channel that fails fails them all."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)
from pdray.deployments.caller_deadlines import CallerDeadlines  # noqa: E402
from pdray.deployments.output_channels import ChannelClient, ChannelHub  # noqa: E402
from pdray.deployments.replica import PDReplica  # noqa: E402

from pdray.engine.loop import EngineLoop  # noqa: E402
from pdray.engine.role_worker import RequestFailed  # noqa: E402
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
    replica = PDReplica.__new__(PDReplica)  # no Serve context: only what reserve/channel use
    replica.replica_id = "d0"
    if hold:  # the loop admits nothing: the request stays reserved
        worker.has_runnable_work = lambda: False
        worker.has_work = lambda: False
    replica.worker = worker
    replica.loop = EngineLoop(worker)
    replica.late = []  # what the reaper would abort once every deadline has passed
    replica._deadlines = CallerDeadlines(60.0, replica.late.append, clock=lambda: replica.now_s)
    replica._channels = ChannelHub(ended=replica._deadlines.end, abort=replica._abort_late)
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


def _output(request_id: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    reason = "length" if finished else None
    done = CompletionOutput(index=0, text="x" * len(tokens), token_ids=tokens, finish_reason=reason)
    return RequestOutput(request_id, "the prompt", [1, 2], [done], finished=finished)


def test_the_ticket_comes_back_and_the_outputs_through_the_channel():
    worker = _ScriptedDecode(room=True)
    replica = _replica(worker)

    async def main():
        ticket = await replica.reserve("r", [1, 2], {}, "c", replica_id="d0")
        batches = replica.channel("c", replica_id="d0")
        batch = await asyncio.wait_for(anext(batches), 5)
        await batches.aclose()
        return ticket, batch

    try:
        ticket, batch = asyncio.run(main())
        assert ticket == {"request_id": "r"}
        [(request_id, output)] = batch
        assert request_id == "r" and output.finished and output.outputs[0].token_ids == [7, 8]
        assert worker.aborted == [] and _reaped(replica) == []  # it ended: no deadline left
    finally:
        replica.loop.close()


def test_no_room_is_none_and_the_request_is_dropped():
    worker = _ScriptedDecode(room=False)
    replica = _replica(worker)

    async def main():
        return await replica.reserve("r", [1, 2], {}, "c", replica_id="d0")

    try:
        assert asyncio.run(main()) is None
        assert worker.aborted == ["r"] and _reaped(replica) == []
        assert len(replica._channels) == 1  # the channel was named, nothing is pending on it
        assert not replica._channels._channels["c"].open
    finally:
        replica.loop.close()


@pytest.mark.parametrize("leave", ["aclose", "cancel"])
def test_a_channel_its_router_closes_aborts_the_requests_left_on_it(leave):
    worker = _ScriptedDecode(room=True)
    replica = _replica(worker, hold=True)

    async def main():
        assert await replica.reserve("r", [1, 2], {}, "c", replica_id="d0") is not None
        batches = replica.channel("c", replica_id="d0")
        task = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.05)
        if leave == "cancel":  # Serve cancels the task that iterates a streaming call
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await batches.aclose()

    try:
        asyncio.run(main())
        _wait_until(lambda: worker.aborted == ["r"])
        assert _reaped(replica) == []  # nothing left for the reaper
    finally:
        replica.loop.close()


def test_a_call_for_another_replica_is_refused():
    replica = _replica(_ScriptedDecode(room=True))

    async def reserve():
        return await replica.reserve("r", [1], {}, "c", replica_id="d1")

    async def channel():
        return [batch async for batch in replica.channel("c", replica_id="d1")]

    try:
        for call in (reserve, channel):
            with pytest.raises(RuntimeError, match="no longer serving"):
                asyncio.run(call())
    finally:
        replica.loop.close()


def _engine_thread(fn) -> None:
    """Run fn on another thread, as the engine loop's puts are."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join(5)


def test_one_batch_carries_every_request_latest_output_and_the_prompt_once():
    ended, aborted = [], []

    async def main():
        hub = ChannelHub(ended=ended.append, abort=aborted.append)
        sinks = {r: hub.sink("c", r) for r in ("a", "b")}

        def step_twice():
            for tokens in ([7], [7, 8]):  # two steps before the stream reads: cumulative
                for request_id, sink in sinks.items():
                    sink.put(_output(request_id, tokens))

        _engine_thread(step_twice)
        batches = hub.stream("c")
        first = await asyncio.wait_for(anext(batches), 5)
        _engine_thread(lambda: sinks["a"].put(_output("a", [7, 8, 9], finished=True)))
        second = await asyncio.wait_for(anext(batches), 5)
        await batches.aclose()
        return first, second

    first, second = asyncio.run(main())
    assert [(r, o.outputs[0].token_ids) for r, o in first] == [("a", [7, 8]), ("b", [7, 8])]
    assert all(o.prompt_token_ids == [1, 2] for _, o in first)  # the prompt, once
    [(request_id, output)] = second
    assert request_id == "a" and output.finished and output.prompt_token_ids is None
    assert ended == ["a", "b"] and aborted == ["b"]  # b was left on the closed channel


def _connected():
    """A hub and a client reading it in this event loop; `call(request_id, channel_id)` is a
    replica's start of a request (its sink goes into `sinks`), answering a ticket."""
    hub = ChannelHub(ended=lambda r: None, abort=lambda r: None)
    client = ChannelClient(hub.stream)
    sinks = {}

    async def call(request_id, channel_id):
        sinks[request_id] = hub.sink(channel_id, request_id)
        return {"ticket": request_id}

    return client, sinks, call


def test_the_client_routes_each_request_its_items_and_restores_the_prompt():
    """Both ends in one event loop: the client's stream is the hub's."""

    async def main():
        client, sinks, call = _connected()

        streams = {
            r: client.request(r, lambda channel_id, r=r: call(r, channel_id), reply=True)
            for r in ("a", "b")
        }
        tickets = {r: await anext(s) for r, s in streams.items()}

        def steps():
            for request_id, sink in sinks.items():
                sink.put(_output(request_id, [5]))
            time.sleep(0.05)  # the first outputs go out before the last ones come
            for request_id, sink in sinks.items():
                sink.put(_output(request_id, [5, 6], finished=True))

        threading.Thread(target=steps).start()
        got = {}
        for request_id, stream in streams.items():
            got[request_id] = [o async for o in stream]
        return tickets, got, len(client)

    tickets, got, left = asyncio.run(main())
    assert tickets == {"a": {"ticket": "a"}, "b": {"ticket": "b"}}
    for request_id, outputs in got.items():
        assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == [5, 6]
        assert all(o.request_id == request_id and o.prompt_token_ids == [1, 2] for o in outputs)
    assert left == 0  # both ended: unregistered


def test_a_replica_ends_an_idle_channel_and_the_client_reopens_it_for_a_request_on_its_way():
    """The replica ends a channel with no request after idle_s. A request the client registered
    meanwhile (its call not there yet) is still delivered: the client reopens the stream."""
    opened = []

    async def main():
        hub = ChannelHub(ended=lambda r: None, abort=lambda r: None, idle_s=0.05)

        def open_stream(channel_id):
            opened.append(channel_id)
            return hub.stream(channel_id)

        client = ChannelClient(open_stream)
        sink_made = asyncio.Event()

        async def slow_call(channel_id):
            await asyncio.sleep(0.3)  # the replica's stream ends idle meanwhile
            sink = hub.sink(channel_id, "r")
            sink_made.set()
            threading.Thread(target=lambda: sink.put(_output("r", [4], finished=True))).start()

        outputs = [o async for o in client.request("r", slow_call)]
        await asyncio.sleep(0.2)  # no request left: the replica ends the stream, the client ends
        return outputs, len(hub), client._task.done()

    outputs, channels_left, client_done = asyncio.run(main())
    assert [o.outputs[0].token_ids for o in outputs] == [[4]]
    assert len(opened) >= 2 and len(set(opened)) == 1  # reopened, same channel id
    assert channels_left == 0 and client_done


def test_a_failed_channel_fails_every_request_on_it_and_later_ones():
    async def main():
        ready = asyncio.Event()

        async def dying_stream(channel_id):
            await ready.wait()
            raise RuntimeError("ActorDiedError: the replica died")
            yield  # an async generator, like a streaming call

        closed = []
        client = ChannelClient(dying_stream, closed.append)

        async def call(channel_id):
            return None

        errors = []

        async def consume(request_id):
            try:
                [o async for o in client.request(request_id, call)]
            except RuntimeError as e:
                errors.append((request_id, str(e)))

        tasks = [asyncio.ensure_future(consume(r)) for r in ("a", "b")]
        await asyncio.sleep(0.05)
        ready.set()
        await asyncio.gather(*tasks)
        with pytest.raises(RuntimeError, match="replica died"):
            await anext(client.request("c", call))
        return errors, closed == [client]

    errors, closed = asyncio.run(main())
    assert sorted(r for r, _ in errors) == ["a", "b"]
    assert all("replica died" in e for _, e in errors) and closed


def test_failed_items_end_only_their_request():
    """A request the engine failed (RequestFailed) raises its error; the others go on."""

    async def main():
        client, sinks, call = _connected()

        a = client.request("a", lambda c: call("a", c))
        b = client.request("b", lambda c: call("b", c))
        task_a = asyncio.ensure_future(anext(a))
        task_b = asyncio.ensure_future(anext(b))
        await asyncio.sleep(0.05)
        failure = RequestFailed("a", RuntimeError("engine step failed"))
        _engine_thread(lambda: (sinks["a"].put(failure), sinks["b"].put(_output("b", [3]))))
        with pytest.raises(RuntimeError, match="engine step failed"):
            await task_a
        assert (await task_b).outputs[0].token_ids == [3]
        await b.aclose()

    asyncio.run(main())
