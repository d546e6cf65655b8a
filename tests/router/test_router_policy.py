"""Instance choice: least loaded within a random window; down, expired, excluded never picked."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from pdray.config import Role
from pdray.entrypoints.openai.protocol import NoCapacityError
from pdray.router.policy import InstancePicker, PolicyConfig, RouterSnapshot, RoutingPolicy
from pdray.router.store import InstanceRecord, InstanceStore


def prefill(instance_id: str, queued: int) -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, role=Role.PREFILL, queued_prefill_tokens=queued)


def decode(instance_id: str, running: int, free: int = 100, waiting: int = 0) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        role=Role.DECODE,
        running_requests=running,
        waiting_requests=waiting,
        free_kv_blocks=free,
        total_kv_blocks=128,
    )


def picks(pick, trials: int = 300) -> Counter:
    return Counter(pick().instance_id for _ in range(trials))


NO_WINDOW = PolicyConfig(prefill_window_tokens=0, decode_window_requests=0, window_fraction=0)


async def prefill_ids_until(snapshot: RouterSnapshot, done, failure: str, *, every=None):
    """Poll the snapshot's prefill ids until done(ids), calling `every()` (heartbeats) between
    looks; AssertionError naming `failure` and the ids seen after 10 s."""
    deadline = time.monotonic() + 10
    while not done(ids := {r.instance_id for r in snapshot.records(Role.PREFILL)}):
        assert time.monotonic() < deadline, f"{failure} within 10 s (prefill ids {ids})"
        if every is not None:
            await every()
        await asyncio.sleep(0.05)


def test_least_loaded_prefill_and_decode():
    picker = InstancePicker(NO_WINDOW, random.Random(0))
    records = [prefill("p0", 900), prefill("p1", 40), prefill("p2", 300), decode("d0", 5)]
    records += [decode("d1", 2, waiting=2), decode("d2", 3)]
    assert picks(lambda: picker.pick_prefill(records)) == {"p1": 300}
    assert picks(lambda: picker.pick_decode(records)) == {"d2": 300}


def test_random_window_spreads_over_near_best_only():
    config = PolicyConfig(prefill_window_tokens=100, decode_window_requests=1, window_fraction=0)
    picker = InstancePicker(config, random.Random(0))
    records = [prefill("p0", 1000), prefill("p1", 1050), prefill("p2", 1101)]
    counts = picks(lambda: picker.pick_prefill(records))
    assert set(counts) == {"p0", "p1"} and min(counts.values()) > 100
    decodes = [decode("d0", 4), decode("d1", 5), decode("d2", 6)]
    assert set(picks(lambda: picker.pick_decode(decodes))) == {"d0", "d1"}
    fractional = InstancePicker(PolicyConfig(prefill_window_tokens=0, window_fraction=0.1))
    assert set(picks(lambda: fractional.pick_prefill(records))) == {"p0", "p1"}


def test_decode_needs_free_blocks_and_random_policy():
    picker = InstancePicker(NO_WINDOW, random.Random(0))
    tied = [decode("fuller", 2, free=10), decode("emptier", 2, free=90)]
    assert picks(lambda: picker.pick_decode(tied)) == {"emptier": 300}
    records = [decode("busy-but-roomy", 9, free=50), decode("idle-but-full", 0, free=1)]
    assert picker.pick_decode(records, num_tokens=100).instance_id == "busy-but-roomy"
    with pytest.raises(NoCapacityError, match="KV blocks free for 5000 tokens"):
        picker.pick_decode(records, num_tokens=5000)
    uniform = InstancePicker(PolicyConfig(decode_policy=RoutingPolicy.RANDOM), random.Random(1))
    records = [decode("d0", 0), decode("d1", 50)]
    assert set(picks(lambda: uniform.pick_decode(records))) == {"d0", "d1"}


def test_excluded_and_wrong_role_never_picked():
    picker = InstancePicker(rng=random.Random(0))
    records = [prefill("p0", 0), prefill("p1", 5000), decode("d0", 0)]
    assert picks(lambda: picker.pick_prefill(records, exclude={"p0"})) == {"p1": 300}
    with pytest.raises(NoCapacityError, match="1 excluded"):
        picker.pick_decode(records, exclude=["d0"])
    with pytest.raises(NoCapacityError, match="mixed"):
        picker.pick_decode(records, role=Role.MIXED)
    with pytest.raises(NoCapacityError):
        picker.pick_prefill([])


@pytest.mark.anyio
async def test_snapshot_never_picks_down_or_expired_instances(redis_server, app_name):
    store = InstanceStore(redis_server.url, app_name, ttl_s=1.0, down_s=30)
    await store.heartbeat(prefill("p-best", 0))
    await store.heartbeat(prefill("p-dies", 0))
    await store.heartbeat(prefill("p-other", 10_000))
    await store.heartbeat(decode("d0", 0))
    picker = InstancePicker(NO_WINDOW, random.Random(0))
    async with RouterSnapshot(store, picker=picker, refresh_interval_s=0.1) as snapshot:
        assert set(picks(snapshot.pick_prefill, 50)) == {"p-best", "p-dies"}
        await snapshot.mark_down("p-best")
        await store.heartbeat(prefill("p-best", 0))  # alive again, still down here

        async def keep_others_alive():  # p-dies stops heartbeating
            for r in (prefill("p-best", 0), prefill("p-other", 10_000), decode("d0", 0)):
                await store.heartbeat(r)

        await prefill_ids_until(
            snapshot,
            lambda ids: "p-dies" not in ids,
            "p-dies did not expire",
            every=keep_others_alive,
        )
        await keep_others_alive()
        assert picks(snapshot.pick_prefill, 50) == {"p-other": 50}
        assert snapshot.pick_decode().instance_id == "d0"
        await store.heartbeat(prefill("p-new", 0))
        await prefill_ids_until(  # the background refresh sees newcomers
            snapshot, lambda ids: "p-new" in ids, "the snapshot did not see p-new"
        )
    await store.close()


@pytest.mark.anyio
async def test_stale_snapshot_drops_records_older_than_ttl(redis_server, app_name):
    store = InstanceStore(redis_server.url, app_name, ttl_s=1.0)
    await store.heartbeat(decode("d0", 0))
    snapshot = RouterSnapshot(store)
    await snapshot.refresh()  # no background refresh: the snapshot goes stale
    assert snapshot.pick_decode().instance_id == "d0"
    deadline = time.monotonic() + 10
    while snapshot.records(Role.DECODE):  # d0's heartbeat ages past the TTL
        assert time.monotonic() < deadline, "the stale record of d0 was still picked after 10 s"
        await asyncio.sleep(0.05)
    with pytest.raises(NoCapacityError):
        snapshot.pick_decode()
    with pytest.raises(ValueError, match="below the TTL"):
        RouterSnapshot(store, refresh_interval_s=1.0)
    await store.close()
