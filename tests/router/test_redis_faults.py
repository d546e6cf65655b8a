"""Redis faults while a RouterSnapshot and two instances' heartbeats run against a real
redis-server: stopped and restarted on the same port, or frozen (SIGSTOP: connections accepted,
never answered). The snapshot keeps serving its last records (until they age past the TTL) and
its refreshes return within their deadline without raising; the heartbeats go on (metrics
included); both loops survive, and the records come back when Redis does. Stopping leaves no
task, thread or record behind."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import pytest

from pdray.config import Role
from pdray.entrypoints.openai.protocol import NoCapacityError
from pdray.router.heartbeat import run_heartbeat
from pdray.router.policy import RouterSnapshot
from pdray.router.redis_server import RedisServer
from pdray.router.store import InstanceRecord, InstanceStore, connect

TTL_S = 2.0
PERIOD_S = 0.2  # heartbeats and background refreshes
TIMEOUT_S = 0.3  # per Redis call
WAIT_S = 15.0


class Instances:
    """Two instances heartbeating in threads, as replicas do; counts records made and passed
    to metrics."""

    def __init__(self, url: str, app_name: str):
        self.made, self.observed = Counter(), Counter()
        self.stop = threading.Event()
        self.threads = []
        for instance_id, role in (("p0", Role.PREFILL), ("d0", Role.DECODE)):
            thread = threading.Thread(
                target=run_heartbeat,
                kwargs=dict(
                    key=f"pdray:{app_name}:instance:{instance_id}", ttl_s=TTL_S,
                    make_record=lambda i=instance_id, r=role: self._record(i, r),
                    redis_url=lambda: url, stop=self.stop,
                    on_record=lambda record: self.observed.update([record.instance_id]),
                    period_s=PERIOD_S, timeout_s=TIMEOUT_S,
                ),
                daemon=True,
            )  # fmt: skip
            thread.start()
            self.threads.append(thread)

    def _record(self, instance_id: str, role: Role) -> InstanceRecord:
        self.made.update([instance_id])
        return InstanceRecord(instance_id=instance_id, role=role, free_kv_blocks=8,
                              total_kv_blocks=8)  # fmt: skip

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_S)
        assert not any(t.is_alive() for t in self.threads), "a heartbeat thread did not end"


async def wait_for(what: str, predicate, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.05)


def ids(snapshot: RouterSnapshot) -> set[str]:
    return {r.instance_id for r in snapshot.records()}


async def timed_refresh(snapshot: RouterSnapshot) -> float:
    start = time.monotonic()
    await snapshot.refresh()  # raises nothing
    return time.monotonic() - start


@pytest.mark.anyio
async def test_redis_restarted_on_the_same_port(app_name):
    before = asyncio.all_tasks()
    server = RedisServer()
    url = server.start()
    port = server.port
    store = InstanceStore(url, app_name, TTL_S, timeout_s=TIMEOUT_S)
    instances = Instances(url, app_name)
    snapshot = RouterSnapshot(store, refresh_interval_s=PERIOD_S)
    await snapshot.start()
    try:
        await wait_for("both records in the snapshot", lambda: ids(snapshot) == {"p0", "d0"})
        server.stop()
        down_s = time.monotonic()
        # the last snapshot serves while its records are fresh; refreshing costs a deadline
        assert await timed_refresh(snapshot) < snapshot.refresh_timeout_s + 1
        assert snapshot.pick_decode().instance_id == "d0"
        assert snapshot.outage.error and "Redis unreachable" in snapshot.outage.describe()
        made, observed = sum(instances.made.values()), sum(instances.observed.values())
        await wait_for(
            "the heartbeats going on (metrics too) while Redis is down",
            lambda: (
                sum(instances.made.values()) >= made + 4
                and sum(instances.observed.values()) >= observed + 4
            ),
        )
        # records age out after the TTL: then nothing is picked (the router answers 503)
        await wait_for("the records aging out", lambda: not ids(snapshot), TTL_S + WAIT_S)
        assert time.monotonic() - down_s >= TTL_S - PERIOD_S - 0.1  # not before their TTL
        with pytest.raises(NoCapacityError):
            snapshot.pick_decode()
        assert instances.alive() and not snapshot._task.done()

        restarted = RedisServer(port=port)
        assert restarted.start() == url  # the same port: clients keep their URL
        server = restarted
        await wait_for("the records back (heartbeats re-created them)",
                       lambda: ids(snapshot) == {"p0", "d0"})  # fmt: skip
        assert snapshot.outage.error is None
        assert snapshot.pick_decode().instance_id == "d0"
    finally:
        instances.close()
        await snapshot.stop()
        await store.close()
    with connect(url) as client:  # a clean stop deletes the records
        assert client.keys(f"pdray:{app_name}:*") == []
    server.stop()
    assert asyncio.all_tasks() <= before  # no refresh or snapshot task left


@pytest.mark.anyio
async def test_frozen_redis_costs_each_call_its_deadline(app_name):
    """SIGSTOP: the kernel still accepts connections, nothing answers. Without socket
    timeouts every call would hang, stalling the heartbeat and the snapshot for good."""
    before = asyncio.all_tasks()
    with RedisServer() as server:
        store = InstanceStore(server.url, app_name, TTL_S, timeout_s=TIMEOUT_S)
        instances = Instances(server.url, app_name)
        snapshot = RouterSnapshot(store, refresh_interval_s=PERIOD_S)
        await snapshot.start()
        frozen = False
        try:
            await wait_for("both records in the snapshot", lambda: ids(snapshot) == {"p0", "d0"})
            os.kill(server.pid, signal.SIGSTOP)
            frozen = True
            assert await timed_refresh(snapshot) < snapshot.refresh_timeout_s + 1
            assert snapshot.outage.error and snapshot.pick_decode().instance_id == "d0"
            made = sum(instances.made.values())
            await wait_for(  # each SET waits at most 2 x its timeout, then the next period
                "the heartbeats going on while Redis is frozen",
                lambda: sum(instances.made.values()) >= made + 4,
            )
            assert instances.alive() and not snapshot._task.done()
            os.kill(server.pid, signal.SIGCONT)
            frozen = False
            await wait_for("the snapshot reading Redis again", lambda: not snapshot.outage.error)
            assert ids(snapshot) == {"p0", "d0"}
        finally:
            if frozen:
                os.kill(server.pid, signal.SIGCONT)
            instances.close()
            await snapshot.stop()
            await store.close()
    assert asyncio.all_tasks() <= before  # no refresh or snapshot task left
