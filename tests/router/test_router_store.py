"""Instance records in a real Redis: round trip, TTL expiry, removal, mark-down, isolation."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from pdray.config import Role
from pdray.router.store import InstanceRecord, InstanceStore

pytestmark = pytest.mark.anyio


def record(instance_id: str, role: Role = Role.DECODE, **load) -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, role=role, host="127.0.0.1", **load)


async def ids_until(store: InstanceStore, want: list[str], *, every=None, timeout_s=10.0):
    """Poll the store's snapshot until its instance ids are `want`, calling `every()` (a
    heartbeat) before each look; AssertionError naming the ids seen after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if every is not None:
            await every()
        ids = [r.instance_id for r in await store.snapshot()]
        if ids == want:
            return
        assert time.monotonic() < deadline, f"ids still {ids}, not {want}, after {timeout_s} s"
        await asyncio.sleep(0.05)


async def test_heartbeat_and_snapshot_round_trip(redis_server, app_name):
    store = InstanceStore(redis_server.url, app_name, ttl_s=5)
    sent = record(
        "d0",
        address={"deployment": "decode", "replica": "r1"},
        kv_transport={"kind": "cuda_ipc", "handles": ["abc"]},
        running_requests=3,
        free_kv_blocks=100,
        total_kv_blocks=128,
    )
    await store.heartbeat(sent)
    await store.heartbeat(record("p0", Role.PREFILL, queued_prefill_tokens=77))
    got = await store.snapshot()
    assert [r.instance_id for r in got] == ["d0", "p0"]
    assert got[0] == sent and got[1].role is Role.PREFILL
    ttl_ms = redis.Redis.from_url(redis_server.url).pttl(store.key("d0"))
    assert 0 < ttl_ms <= 5000
    await store.close()


async def test_records_expire_after_ttl_unless_refreshed(redis_server, app_name):
    store = InstanceStore(redis_server.url, app_name, ttl_s=0.6)
    await store.heartbeat(record("gone"))
    await store.heartbeat(record("alive"))
    # "alive" heartbeats right before each look, so only a TTL-long stall could expire it
    await ids_until(store, ["alive"], every=lambda: store.heartbeat(record("alive")))
    await ids_until(store, [])
    await store.close()


async def test_remove_and_app_isolation(redis_server, app_name):
    ours = InstanceStore(redis_server.url, app_name, ttl_s=5)
    other = InstanceStore(redis_server.url, app_name + "-other", ttl_s=5)
    await ours.heartbeat(record("a"))
    await other.heartbeat(record("b"))
    assert [r.instance_id for r in await ours.snapshot()] == ["a"]
    assert [r.instance_id for r in await other.snapshot()] == ["b"]
    await ours.remove("a")
    assert await ours.snapshot() == []
    await ours.close()
    await other.close()


async def test_mark_down_deletes_and_blacklists_for_a_while(redis_server, app_name):
    store = InstanceStore(redis_server.url, app_name, ttl_s=5, down_s=1.0)
    await store.heartbeat(record("flaky"))
    await store.heartbeat(record("ok"))
    await store.mark_down("flaky")
    assert not redis.Redis.from_url(redis_server.url).exists(store.key("flaky"))
    await store.heartbeat(record("flaky"))  # it comes back at once: still skipped
    assert [r.instance_id for r in await store.snapshot()] == ["ok"]
    await ids_until(store, ["flaky", "ok"])  # seen again once down_s has passed
    await store.close()


async def test_snapshot_tolerates_expiry_mid_scan_and_bad_records(redis_server, app_name):
    store = InstanceStore(redis_server.url, app_name, ttl_s=5)
    for name in ("a", "b", "c"):
        await store.heartbeat(record(name))
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(store.key("junk"), "{not json", px=5000)
    real_mget = store.redis.mget

    async def mget_after_expiry(keys):
        await store.redis.delete(store.key("b"))  # expires between SCAN and MGET
        return await real_mget(keys)

    store.redis.mget = mget_after_expiry
    assert [r.instance_id for r in await store.snapshot()] == ["a", "c"]
    await store.close()


def test_record_and_store_validation():
    with pytest.raises(ValueError):
        InstanceRecord(instance_id="x", role="decode", free_kv_blocks=-1)
    with pytest.raises(ValueError):
        InstanceRecord(instance_id="x", role="sideways")
    with pytest.raises(ValueError):
        InstanceRecord(instance_id="x", role="decode", unknown_field=1)
    with pytest.raises(ValueError, match="ttl_s"):
        InstanceStore("redis://127.0.0.1:1/0", "app", ttl_s=0)
    with pytest.raises(ValueError, match="app_name"):
        InstanceStore("redis://127.0.0.1:1/0", "a:b")
