"""ReplicaIdRouter: a call goes to the replica it names; one that is gone gets refused fast."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)
from pdray.deployments.routing import UNLISTED_GRACE_S, ReplicaIdRouter  # noqa: E402


def replica(unique_id: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def choose(router, replicas, target: str | None, waited_s: float = 0.0):
    pending = SimpleNamespace(kwargs={"replica_id": target}, created_at=time.time() - waited_s)
    chosen = asyncio.run(router.choose_replicas(replicas, pending))
    return [[r.replica_id.unique_id for r in group] for group in chosen]


def test_replica_id_router():
    router = ReplicaIdRouter.__new__(ReplicaIdRouter)  # choose_replicas needs no Serve state
    router.initialize_state()
    a, b = replica("a"), replica("b")
    assert choose(router, [a, b], "b") == [["b"]]
    assert choose(router, [a, b], None) == [["a", "b"]]
    # "b" was listed and is gone: any replica takes the call (and refuses it)
    assert choose(router, [a], "b") == [["a"]]
    # "c" was never listed: it may be starting, so the call waits for it a while
    assert choose(router, [a], "c") == []
    assert choose(router, [a], "c", waited_s=UNLISTED_GRACE_S + 1) == [["a"]]
