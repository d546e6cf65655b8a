"""/health of the router reports ready only once a prefill/decode pair or a mixed replica is
registered (the app answers HTTP before its engines have sent their first heartbeat)."""

from __future__ import annotations

import pytest
from pdray.deployments.args import AppArgs
from pdray.deployments.router import PDBackend

from pdray.config import Role
from pdray.router.store import InstanceRecord, InstanceStore


@pytest.mark.anyio
async def test_ready_once_a_pair_or_a_mixed_replica_is_registered(redis_server, app_name):
    backend = PDBackend(AppArgs(redis_url=redis_server.url, app_name=app_name))
    store = InstanceStore(redis_server.url, app_name, ttl_s=30)
    try:
        with pytest.raises(RuntimeError, match="no prefill/decode pair or mixed replica"):
            await backend.check_health()
        await store.heartbeat(InstanceRecord(instance_id="p0", role=Role.PREFILL))
        with pytest.raises(RuntimeError, match="no prefill/decode pair"):
            await backend.check_health()  # a prefill replica alone cannot serve
        await store.heartbeat(
            InstanceRecord(instance_id="d0", role=Role.DECODE, free_kv_blocks=8, total_kv_blocks=8)
        )
        await backend.check_health()
        await store.remove("p0")
        await store.remove("d0")
        await store.heartbeat(InstanceRecord(instance_id="m0", role=Role.MIXED))
        await backend.check_health()
    finally:
        if backend.snapshot is not None:
            await backend.snapshot.stop()
        await store.close()
