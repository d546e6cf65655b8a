"""PDBackend's attempts against a real Redis snapshot and scripted instances (no Serve): a full
decode instance is healthy (not marked down); the request tries the other one, or waits for room
and then completes; it also waits for a decode instance whose record is missing; a dead one is
marked down and the next pair serves."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)
from pdray.deployments import metrics  # noqa: E402
from pdray.deployments.args import AppArgs  # noqa: E402
from pdray.deployments.router import PDBackend  # noqa: E402

from pdray.config import Role  # noqa: E402
from pdray.engine.role_worker import (  # noqa: E402
    FailureKind,
    HandoffFailed,
    PrefillResult,
    RequestFailed,
)
from pdray.entrypoints.openai.protocol import NoCapacityError  # noqa: E402
from pdray.outputs import CompletionOutput, RequestOutput  # noqa: E402
from pdray.router.policy import InstancePicker, PolicyConfig, RouterSnapshot  # noqa: E402
from pdray.router.redis_server import RedisServer  # noqa: E402
from pdray.router.store import InstanceRecord, InstanceStore  # noqa: E402
from pdray.sampling_params import SamplingParams  # noqa: E402

TTL_S = 5.0
STATUSES: list[str] = []  # the `requests` metric's status of each request that ended


class _Method:
    def __init__(self, fn, calls: list[str], name: str):
        self.fn, self.calls, self.name = fn, calls, name

    def remote(self, *args, replica_id: str, **kwargs):
        self.calls.append(self.name)
        call = self.fn(replica_id, *args, **kwargs)  # sent now, like a Serve handle's call
        return asyncio.ensure_future(call) if asyncio.iscoroutine(call) else _Stream(call)


class _Stream:
    """A streaming call, like Serve's DeploymentResponseGenerator (`cancel` included)."""

    def __init__(self, gen):
        self.gen, self.cancelled = gen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await anext(self.gen)

    def cancel(self) -> None:
        self.cancelled = True


class _RayError(RuntimeError):
    """What a Serve handle raises for an exception in a replica: the original is `cause`."""

    def __init__(self, cause: Exception):
        super().__init__(f"ray::ServeReplica:Decode: {cause}")
        self.cause = cause


class FakeInstances:
    """Stands in for the Prefill and Decode deployment handles: `reserve` answers from `room`
    (instance -> free reservations; None = the actor died). Prefill streams the first token (7)
    and its PrefillResult; decode streams its admission output (the first token again) and then
    the finished output [first, 8], or raises what `fails` says for that instance."""

    def __init__(self, room: dict[str, int | None], fails: dict | None = None, first=None):
        self.room = room
        self.reserved: list[str] = []
        self.fails = fails or {}  # decode instance -> exception its stream raises
        self.first = first or {}  # decode instance -> first token it recomputed (default 7)
        self.hold_decode: asyncio.Event | None = None  # decode streams once it is set
        self.attached: list[str] = []
        self.aborted: list[tuple[str, str]] = []  # (instance, attempt id) of each abort call
        self.abort_own: set[str] = set()  # decode instances that end streams with their own abort
        self.prefill_aborts = False  # prefill ends its stream with an abort after the first token
        self.prefill_dies: Exception | None = None  # raised by prefill after the first token
        self.prefill_stops = False  # prefill's first token is a stop: it ends the request
        self.calls: list[str] = []  # the methods called (`remote`), in order
        self.channels: dict[str, asyncio.Queue] = {}  # channel id -> batches not yet read
        self.channels_opened: list[str] = []  # the instance of each channel stream opened
        self.pumps: set[asyncio.Task] = set()

    def options(self, **_):
        return self

    def __getattr__(self, name):
        return _Method(getattr(self, f"_{name}"), self.calls, name)

    async def _reserve(self, replica_id, request_id, prompt, params, channel):
        if self.room[replica_id] is None:
            raise RuntimeError("ActorDiedError: the actor died unexpectedly")
        if self.room[replica_id] == 0:
            return None
        self.room[replica_id] -= 1
        self.reserved.append(replica_id)
        self._feed(channel, request_id, self._stream(replica_id, request_id))
        return {"ticket": request_id}

    def _feed(self, channel: str, request_id: str, outputs) -> None:
        """The request's outputs into its router's channel, as a replica's ChannelHub sends
        them; an error ends only this request (a replica's death ends its channel)."""

        async def pump():
            queue = self.channels.setdefault(channel, asyncio.Queue())
            try:
                async for output in outputs:
                    await queue.put([(request_id, output)])
            except Exception as e:
                await queue.put([(request_id, RequestFailed(request_id, e))])

        task = asyncio.ensure_future(pump())
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

    async def _channel(self, replica_id, channel_id):
        died = self.fails.get(replica_id)
        if died is not None and not isinstance(died, HandoffFailed):
            raise _RayError(died)  # the replica died: its channel stream fails
        self.channels_opened.append(replica_id)
        queue = self.channels.setdefault(channel_id, asyncio.Queue())
        while True:
            yield await queue.get()

    async def _prefill(self, replica_id, request_id, prompt, params, ticket, ticket_follows=False):
        assert (
            ticket is None
        ) == ticket_follows  # the ticket comes with the call or through attach
        yield _out(request_id, [7], "stop" if self.prefill_stops else None)
        if self.prefill_dies is not None:
            raise _RayError(self.prefill_dies)
        if self.prefill_aborts:  # EngineLoop's answer to an abort: the output so far, ended
            yield _out(request_id, [7], "abort")
            return
        yield PrefillResult(request_id, None)

    async def _stream(self, replica_id, request_id):
        if isinstance(self.fails.get(replica_id), HandoffFailed):
            raise _RayError(self.fails[replica_id])  # a request the replica could not admit
        first = self.first.get(replica_id, 7)
        if self.hold_decode is not None:
            await self.hold_decode.wait()
        yield _out(request_id, [first], None)  # admission: the first token again
        if replica_id in self.abort_own or (replica_id, request_id) in self.aborted:
            yield _out(request_id, [first], "abort")
            return
        yield _out(request_id, [first, 8], "length")

    async def _attach(self, replica_id, request_id, ticket):
        self.attached.append(request_id)
        return True

    async def _abort(self, replica_id, request_id):
        await asyncio.sleep(0.005)  # a round trip: a caller cancelled meanwhile never sent it
        self.aborted.append((replica_id, request_id))
        if self.hold_decode is not None:
            self.hold_decode.set()


def _out(request_id: str, tokens: list[int], reason: str | None) -> RequestOutput:
    text = CompletionOutput(index=0, text="x" * len(tokens), token_ids=tokens, finish_reason=reason)
    return RequestOutput(request_id, "", [1, 2], [text], finished=reason is not None)


def record(instance_id: str, role: Role, free: int = 100) -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, role=role, free_kv_blocks=free,
                          total_kv_blocks=128, block_size=16)  # fmt: skip


async def _backend(
    checkpoint, redis_url: str, room: dict, fails=None, first=None, **args
) -> PDBackend:
    app_args = AppArgs(model=str(checkpoint("llama3")), redis_url=redis_url, **args)
    backend = PDBackend(app_args)
    store = InstanceStore(redis_url, app_args.app_name, TTL_S)
    for r in [record("p0", Role.PREFILL)] + [record(d, Role.DECODE) for d in room]:
        await store.heartbeat(r)
    backend.snapshot = RouterSnapshot(store, picker=InstancePicker(PolicyConfig(window_fraction=0)))
    await backend.snapshot.start()
    backend._started = asyncio.get_running_loop().create_future()
    backend._started.set_result(None)
    decode = FakeInstances(room, fails, first)
    backend._handles = {Role.DECODE: decode, Role.PREFILL: FakeInstances({"p0": 100})}
    return backend


def _in_order():
    """A picker that takes the first instance not excluded (in id order), whatever its room."""

    def first(records, exclude, **_):
        return next(r for r in records if r.instance_id not in exclude)

    return SimpleNamespace(pick_prefill=first, pick_decode=first)


async def _generate(backend: PDBackend, request_id: str = "r", max_tokens: int = 1):
    params = SamplingParams(max_tokens=max_tokens)
    try:
        return [o async for o in backend.generate(request_id, [1, 2], params)]
    finally:  # the attempts' aborts run in tasks of their own
        await asyncio.gather(*backend._background, return_exceptions=True)


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as server:
        yield server.url


@pytest.fixture(autouse=True)
def routing(monkeypatch) -> list[tuple[str, str]]:
    """(replica, outcome) of each routing decision; each ended request's status goes to
    STATUSES; other metrics are dropped."""
    decisions = []
    STATUSES.clear()

    class Metric:
        def __init__(self, name):
            self.name = name

        def inc(self, value=1, tags=None):
            if self.name == "routing":
                decisions.append((tags["replica"], tags["outcome"]))
            elif self.name == "requests":
                STATUSES.append(tags["status"])

        set = observe = inc

    class Metrics:
        def __getattr__(self, name):
            return Metric(name)

    monkeypatch.setattr(metrics, "_metrics", Metrics)
    return decisions


def test_full_decode_is_skipped_not_marked_down(checkpoint, redis_url, routing):
    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 0, "d1": 5}, app_name="full")
        backend.snapshot.picker = _in_order()  # d0 first
        outputs = await _generate(backend)
        assert outputs[-1].finished
        assert backend._handles[Role.DECODE].reserved == ["d1"]
        assert ("d0", "full") in routing and not any(o == "failed" for _, o in routing)
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d0", "d1"}
        await backend.snapshot.stop()

    asyncio.run(main())


def test_request_waits_for_room_then_completes(checkpoint, redis_url):
    async def main():
        room = {"d0": 0}
        backend = await _backend(checkpoint, redis_url, room, app_name="wait")
        task = asyncio.ensure_future(_generate(backend))
        await asyncio.sleep(0.5)
        assert not task.done()  # every decode instance is full: the request waits
        room["d0"] = 1
        outputs = await asyncio.wait_for(task, 5)
        assert outputs[-1].finished and backend._handles[Role.DECODE].reserved == ["d0"]
        await backend.snapshot.stop()

    asyncio.run(main())


def test_no_room_until_the_queue_timeout_is_a_503(checkpoint, redis_url):
    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 0}, app_name="timeout", queue_timeout_s=0.3
        )
        with pytest.raises(NoCapacityError, match="stayed full"):
            await asyncio.wait_for(_generate(backend), 5)
        await backend.snapshot.stop()

    asyncio.run(main())


def test_request_waits_for_a_decode_record_then_completes(checkpoint, redis_url):
    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="late")
        store = backend.snapshot.store
        await store.remove("d0")  # e.g. a replica being replaced, or a heartbeat seen late
        await backend.snapshot.refresh()
        task = asyncio.ensure_future(_generate(backend))
        await asyncio.sleep(0.5)
        assert not task.done()  # no prefill/decode pair: the request waits, no 503
        await store.heartbeat(record("d0", Role.DECODE))
        outputs = await asyncio.wait_for(task, 5)
        assert outputs[-1].finished and backend._handles[Role.DECODE].reserved == ["d0"]
        await backend.snapshot.stop()

    asyncio.run(main())


def test_no_instance_until_the_queue_timeout_is_a_503(checkpoint, redis_url):
    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5}, app_name="none", queue_timeout_s=0.3
        )
        await backend.snapshot.store.remove("d0")
        await backend.snapshot.refresh()
        with pytest.raises(NoCapacityError, match="no mixed instance .* for queue_timeout_s=0.3"):
            await asyncio.wait_for(_generate(backend), 5)
        await backend.snapshot.stop()

    asyncio.run(main())


def test_dead_decode_is_marked_down_and_the_next_pair_serves(checkpoint, redis_url):
    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": None, "d1": 5}, app_name="dead", max_attempts=2
        )
        backend.snapshot.picker = _in_order()  # d0 first
        outputs = await _generate(backend)
        assert outputs[-1].finished and backend._handles[Role.DECODE].reserved == ["d1"]
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d1"}
        await backend.snapshot.stop()

    asyncio.run(main())


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("overlap", [False, True])
def test_first_token_comes_from_prefill_and_is_sent_once(checkpoint, redis_url, overlap):
    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5}, app_name=f"first-{overlap}", overlap_prefill=overlap
        )
        decode = backend._handles[Role.DECODE]
        backend._handles[Role.PREFILL].calls = decode.calls  # one record of both
        decode.hold_decode = asyncio.Event()  # decode has sent nothing yet
        stream = backend.generate("r", [1, 2], SamplingParams(max_tokens=2))
        first = await asyncio.wait_for(anext(stream), 5)
        assert first.outputs[0].token_ids == [7] and not first.finished
        decode.hold_decode.set()
        rest = [o async for o in stream]
        assert _tokens([first, *rest]) == [[7], [7, 8]]  # decode's admission output dropped
        # with overlap, prefill got decode's ticket through `attach`; else with the call
        assert backend._handles[Role.PREFILL].attached == (["r"] if overlap else [])
        # decode reserves in one call (its outputs come through the channel); with overlap,
        # prefill is called first
        calls = [c for c in decode.calls if c not in ("abort", "channel")]
        want = ["prefill", "reserve", "attach"] if overlap else ["reserve", "prefill"]
        assert calls == want
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_request_done_at_its_first_token_ends_at_prefill(checkpoint, redis_url):
    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="one")
        outputs = await _generate(backend, max_tokens=1)
        # the fake prefill output has no finish reason, so decode still ends it
        assert _tokens(outputs) == [[7], [7, 8]] and outputs[-1].finished
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_request_that_decode_finished_is_not_aborted_anywhere(checkpoint, redis_url):
    """Decode's finished output ends the request in both engines (prefill handed it off before
    decode admitted it): no abort calls, which cost the router and both engine loops a call each
    per request."""

    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="no-abort")
        outputs = await _generate(backend, max_tokens=2)
        assert _tokens(outputs) == [[7], [7, 8]] and outputs[-1].finished
        prefill, decode = backend._handles[Role.PREFILL], backend._handles[Role.DECODE]
        assert prefill.aborted == [] and decode.aborted == []
        assert not backend._placed
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_client_that_leaves_aborts_the_request_on_decode(checkpoint, redis_url):
    """A client that leaves mid-stream: the HTTP layer's task is cancelled the way anyio cancels
    (again at every await until the scope is left); the attempt is still aborted on decode,
    whose blocks would otherwise stay taken until the request ran to its end."""
    import anyio

    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="client-left")
        decode = backend._handles[Role.DECODE]
        decode.hold_decode = asyncio.Event()  # decode streams nothing after the first token
        got = []
        with anyio.CancelScope() as scope:
            async for output in backend.generate("r", [1, 2], SamplingParams(max_tokens=4)):
                got.append(output)
                scope.cancel()
        assert _tokens(got) == [[7]]
        await asyncio.gather(*backend._background)
        assert decode.aborted == [("d0", "r")] and not backend._placed
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_request_that_prefill_finished_is_aborted_on_decode(checkpoint, redis_url):
    """A stop at the first token ends the request at prefill; decode, which reserved for it and
    has not finished it, is told to let it go."""

    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="prefill-stop")
        backend._handles[Role.PREFILL].prefill_stops = True
        backend._handles[Role.DECODE].hold_decode = asyncio.Event()  # decode has sent nothing
        outputs = await _generate(backend, max_tokens=4)
        assert _tokens(outputs) == [[7]] and outputs[-1].outputs[0].finish_reason == "stop"
        assert [i for i, _ in backend._handles[Role.DECODE].aborted] == ["d0"]
        assert not backend._placed
        await backend.snapshot.stop()

    asyncio.run(main())


def test_retry_policy_tries_another_pair_without_marking_decode_down(
    checkpoint, redis_url, routing
):
    async def main():
        retry = HandoffFailed(FailureKind.RETRY, "KV transfer lease expired")
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5, "d1": 5}, fails={"d0": retry}, app_name="retry",
            max_attempts=2,
        )  # fmt: skip
        backend.snapshot.picker = _in_order()  # d0 first
        outputs = await _generate(backend, max_tokens=2)
        assert _tokens(outputs) == [[7], [7, 8]]  # the first token once, then d1's
        assert backend._handles[Role.DECODE].reserved == ["d0", "d1"]
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d0", "d1"}
        await backend.snapshot.stop()

    asyncio.run(main())


def test_fail_policy_ends_the_request_and_keeps_decode(checkpoint, redis_url):
    async def main():
        fail = HandoffFailed(FailureKind.FAILED, "KV transfer lease expired")
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5, "d1": 5}, fails={"d0": fail}, app_name="fail"
        )
        backend.snapshot.picker = _in_order()
        with pytest.raises(RuntimeError, match="did not reach decode: KV transfer lease expired"):
            await _generate(backend, max_tokens=2)
        assert backend._handles[Role.DECODE].reserved == ["d0"]  # not retried
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d0", "d1"}
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_retry_that_samples_another_first_token_is_an_error_not_a_repeat(checkpoint, redis_url):
    async def main():
        retry = HandoffFailed(FailureKind.RETRY, "transfer failed")
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5, "d1": 5}, fails={"d0": retry}, first={"d1": 9},
            app_name="diverge", max_attempts=2,
        )  # fmt: skip
        backend.snapshot.picker = _in_order()
        sent = []
        with pytest.raises(RuntimeError, match="differs from the one already streamed"):
            async for output in backend.generate("r", [1, 2], SamplingParams(max_tokens=2)):
                sent.append(output.outputs[0].token_ids)
        assert sent == [[7]]  # nothing contradicting it reached the client
        await backend.snapshot.stop()

    asyncio.run(main())


def test_decode_dying_mid_stream_aborts_the_attempt_on_prefill_and_retries(checkpoint, redis_url):
    """Decode d0 dies after the first token came from prefill (one token sent: resumable): d0 is
    marked down and not called again, the failed attempt is aborted on prefill, and d1 serves
    the request without repeating the first token."""

    async def main():
        died = RuntimeError("ActorDiedError: the actor died unexpectedly")
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5, "d1": 5}, fails={"d0": died}, app_name="died",
            max_attempts=2,
        )  # fmt: skip
        backend.snapshot.picker = _in_order()
        outputs = await _generate(backend, max_tokens=2)
        assert _tokens(outputs) == [[7], [7, 8]]
        await asyncio.gather(*backend._background)  # the background abort of the first attempt
        prefill, decode = backend._handles[Role.PREFILL], backend._handles[Role.DECODE]
        # the failed attempt, once it ended; the second one finished on decode: no abort
        assert prefill.aborted == [("p0", "r")]
        assert "d0" not in {i for i, _ in decode.aborted}  # the dead one is not called
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d1"}
        await backend.snapshot.stop()

    asyncio.run(main())


def test_an_abort_the_router_did_not_send_is_a_failed_attempt_not_a_finished_request(
    checkpoint, redis_url, routing
):
    """Decode d0 ends its stream with finish reason "abort" after only the first token (an engine
    that dropped the request): never a 200 with one token; d1 serves it, d0 is not marked down.
    With no other instance, the request ends with an error."""

    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5, "d1": 5}, app_name="own-abort", max_attempts=2
        )
        backend.snapshot.picker = _in_order()
        backend._handles[Role.DECODE].abort_own = {"d0"}
        outputs = await _generate(backend, max_tokens=2)
        assert (
            _tokens(outputs) == [[7], [7, 8]] and outputs[-1].outputs[0].finish_reason == "length"
        )
        assert ("d0", "failed") in routing
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d0", "d1"}

        backend._handles[Role.DECODE].abort_own = {"d0", "d1"}
        with pytest.raises(NoCapacityError, match="aborted the request"):
            await _generate(backend, "r2", max_tokens=2)
        await backend.snapshot.stop()

    asyncio.run(main())


def test_prefill_ending_its_stream_with_an_abort_leaves_the_request_to_decode(
    checkpoint, redis_url
):
    """The prefill engine drops the request after sending the first token (its stream ends with
    an "abort" output): decode still streams the rest; the client gets every token once."""

    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="prefill-abort")
        backend._handles[Role.PREFILL].prefill_aborts = True
        outputs = await _generate(backend, max_tokens=2)
        assert _tokens(outputs) == [[7], [7, 8]] and outputs[-1].finished
        assert all(o.outputs[0].finish_reason != "abort" for o in outputs)
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_prefill_replica_that_died_is_marked_down_and_decode_finishes(
    checkpoint, redis_url, routing
):
    """The prefill call raises after the first token (its replica died): the request still ends
    with decode's output, and the prefill instance is marked down at once (not left to be picked
    until its record expires)."""

    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5}, app_name="prefill-died")
        prefill = backend._handles[Role.PREFILL]
        prefill.prefill_dies = RuntimeError("ActorDiedError: the actor died unexpectedly")
        outputs = await _generate(backend, max_tokens=2)
        assert _tokens(outputs) == [[7], [7, 8]] and outputs[-1].finished
        await asyncio.gather(*backend._background)  # the mark-down runs in the background
        assert ("p0", "failed") in routing
        assert not backend.snapshot.records(Role.PREFILL)
        await backend.snapshot.stop()

    asyncio.run(main())


def test_a_client_that_leaves_ends_quietly_without_a_retry(checkpoint, redis_url):
    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5, "d1": 5}, app_name="leave", max_attempts=2
        )
        decode = backend._handles[Role.DECODE]
        decode.hold_decode = asyncio.Event()
        stream = backend.generate("r", [1, 2], SamplingParams(max_tokens=2))
        first = await asyncio.wait_for(anext(stream), 5)
        assert first.outputs[0].token_ids == [7]
        await backend.abort("r")  # what the HTTP layer does when the client disconnects
        rest = [o async for o in stream]  # ends without an error
        assert all(o.outputs[0].finish_reason != "length" for o in rest)
        assert len(decode.reserved) == 1  # no second attempt
        assert not backend._leaving
        assert STATUSES == ["aborted"]
        await backend.snapshot.stop()

    asyncio.run(main())


def test_fail_policy_aborts_the_request_on_both_instances(checkpoint, redis_url):
    async def main():
        fail = HandoffFailed(FailureKind.FAILED, "KV transfer lease expired")
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5}, fails={"d0": fail}, app_name="fail-abort"
        )
        with pytest.raises(RuntimeError, match="did not reach decode"):
            await _generate(backend, max_tokens=2)
        prefill, decode = backend._handles[Role.PREFILL], backend._handles[Role.DECODE]
        assert [i for i, _ in prefill.aborted] == ["p0"]
        assert [i for i, _ in decode.aborted] == ["d0"]  # alive: its reservation is released
        assert prefill.aborted[0][1] == decode.aborted[0][1]  # the same attempt
        await backend.snapshot.stop()

    asyncio.run(main())


def test_redis_down_serves_from_the_snapshot_then_503_then_recovers(checkpoint):
    """Redis stopped: a request is served from the router's last snapshot while its records are
    fresh; once they are older than the TTL, one gets a 503 naming Redis after queue_timeout_s.
    Redis restarted on the same port and the instances' heartbeats back: served again."""

    async def main():
        clock = asyncio.get_running_loop().time
        server = RedisServer()
        url = server.start()
        port = server.port
        try:
            backend = await _backend(
                checkpoint, url, {"d0": 5}, app_name="redis-down", queue_timeout_s=0.5
            )
            server.stop()
            assert (await asyncio.wait_for(_generate(backend, "r1"), 5))[-1].finished
            deadline = clock() + TTL_S + 5
            while backend.snapshot.records():  # their heartbeats age past the TTL
                assert clock() < deadline, "records outlived their TTL"
                await asyncio.sleep(0.1)
            start = clock()
            with pytest.raises(NoCapacityError, match="queue_timeout_s=0.5 s; Redis unreachable"):
                await asyncio.wait_for(_generate(backend, "r2"), 10)
            assert clock() - start < 0.5 + backend.snapshot.refresh_timeout_s + 1
            server = RedisServer(port=port)
            assert server.start() == url
            store = InstanceStore(url, "redis-down", TTL_S)
            for r in (record("p0", Role.PREFILL), record("d0", Role.DECODE)):
                await store.heartbeat(r)  # what the replicas' heartbeat loops do
            assert (await asyncio.wait_for(_generate(backend, "r3"), 10))[-1].finished
            assert backend.snapshot.outage.error is None
            await backend.snapshot.stop()
            await store.close()
        finally:
            server.stop()

    asyncio.run(main())


def test_request_timeout_ends_the_request_and_aborts_it_on_both_instances(checkpoint, redis_url):
    """Decode never finishes (it streams nothing after prefill's first token): at
    request_timeout_s the request ends with RequestTimeoutError, and the attempt is aborted on
    the decode and the prefill instance (freeing its blocks), its streams cancelled."""
    from pdray.router.deadline import RequestTimeoutError

    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 5}, app_name="deadline", request_timeout_s=0.5
        )
        decode = backend._handles[Role.DECODE]
        decode.hold_decode = asyncio.Event()  # never set
        clock = asyncio.get_running_loop().time
        start, sent = clock(), []
        with pytest.raises(RequestTimeoutError, match=r"within request_timeout_s=0\.5 s"):
            async for output in backend.generate("r", [1, 2], SamplingParams(max_tokens=4)):
                sent.append(output.outputs[0].token_ids)
        assert 0.5 <= clock() - start < 3
        assert sent == [[7]]  # the first token (from prefill), then nothing
        assert STATUSES == ["timeout"]
        prefill = backend._handles[Role.PREFILL]
        await asyncio.gather(*backend._background)  # the aborts run in tasks of their own
        assert decode.aborted == [("d0", "r")] and prefill.aborted == [("p0", "r")]
        assert backend._placed == {}
        await backend.abort("r")  # the HTTP layer's abort afterwards: nothing left to abort
        assert len(decode.aborted) == 1 and len(prefill.aborted) == 1
        await backend.snapshot.stop()

    asyncio.run(main())


def test_request_timeout_while_queued_is_a_timeout_not_a_503(checkpoint, redis_url):
    """No decode room and queue_timeout_s > request_timeout_s: the deadline ends the wait."""
    from pdray.router.deadline import RequestTimeoutError

    async def main():
        backend = await _backend(
            checkpoint, redis_url, {"d0": 0}, app_name="deadline-queued", queue_timeout_s=30,
            request_timeout_s=0.3,
        )  # fmt: skip
        with pytest.raises(RequestTimeoutError, match="request_timeout_s=0.3 s"):
            await asyncio.wait_for(_generate(backend), 5)
        assert backend._handles[Role.DECODE].reserved == [] and backend._placed == {}
        await backend.snapshot.stop()

    asyncio.run(main())


def test_bad_input_refused_by_decode_reserve_is_a_400_and_decode_stays_up(checkpoint, redis_url):
    """A ValueError from a replica (Ray wraps it: `cause`) is the client's error: it reaches the
    client as a ValueError (400), no other instance is tried, none is marked down."""

    async def main():
        backend = await _backend(checkpoint, redis_url, {"d0": 5, "d1": 5}, app_name="bad")
        decode = backend._handles[Role.DECODE]
        calls = []

        async def refuse(replica_id, request_id, prompt, params, channel):
            calls.append(replica_id)
            raise _RayError(ValueError("seed must fit in 64 bits"))

        decode._reserve = refuse
        with pytest.raises(ValueError, match="seed must fit in 64 bits"):
            await _generate(backend)
        assert len(calls) == 1  # not retried elsewhere
        assert {r.instance_id for r in backend.snapshot.records(Role.DECODE)} == {"d0", "d1"}
        await backend.snapshot.stop()

    asyncio.run(main())
