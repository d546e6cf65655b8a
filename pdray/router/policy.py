"""Choosing instances from the Redis records: load-based picks with a randomised window.

Prefill load is the prompt tokens queued on the instance; decode (and mixed) load is its running
plus waiting requests plus the used fraction of its KV cache (so of two equally busy instances
the emptier one wins), and it must have free KV blocks for the request. `LEAST_LOADED` picks at
random among the candidates whose load is within a window of the best one (an absolute amount
plus a fraction of the best load), so routers working from the same snapshot do not all herd onto
one instance; `RANDOM` picks uniformly. Only instances in the current snapshot, not marked down,
not expired and not excluded by the caller are ever picked; with none, `NoCapacityError`.

`RouterSnapshot` keeps the records in memory for the router's hot path: `start()` reads them
once, then a background task refreshes them every `refresh_interval_s` (a quarter of the TTL by
default); callers may refresh too (concurrent refreshes share one read). A refresh never raises
and never takes longer than `refresh_timeout_s`: if Redis is unreachable (down, restarting,
slow) the old records stay, the outage is logged (`outage`), and each record drops out once its
own heartbeat is older than the TTL, so a stale snapshot never routes to a dead instance for
long. When Redis answers again, the records the instances' heartbeats re-created come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import time
from collections.abc import Callable, Collection

from pydantic import BaseModel, ConfigDict, Field

from pdray.config import Role
from pdray.entrypoints.openai.protocol import NoCapacityError
from pdray.router.store import InstanceRecord, InstanceStore, RedisOutage

logger = logging.getLogger(__name__)

__all__ = [
    "InstancePicker",
    "NoCapacityError",
    "PolicyConfig",
    "RouterSnapshot",
    "RoutingPolicy",
]


class RoutingPolicy(str, enum.Enum):
    LEAST_LOADED = "least_loaded"  # least loaded, at random within a window of the best
    RANDOM = "random"  # uniformly among the instances that can take the request


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_policy: RoutingPolicy = Field(
        RoutingPolicy.LEAST_LOADED, description="How to choose the prefill instance."
    )
    decode_policy: RoutingPolicy = Field(
        RoutingPolicy.LEAST_LOADED, description="How to choose the decode (or mixed) instance."
    )
    prefill_window_tokens: int = Field(
        256, ge=0, description="Prefill instances within this many queued tokens of the best tie."
    )
    decode_window_requests: int = Field(
        1, ge=0, description="Decode instances within this many requests of the best tie."
    )
    window_fraction: float = Field(
        0.1, ge=0, le=1, description="The window also grows by this fraction of the best load."
    )


def prefill_load(record: InstanceRecord) -> float:
    return record.queued_prefill_tokens


def decode_load(record: InstanceRecord) -> float:
    """Requests, plus the used fraction of the KV cache (< 1) to rank equally busy ones."""
    used = 1 - record.free_kv_blocks / record.total_kv_blocks if record.total_kv_blocks else 0.0
    return record.running_requests + record.waiting_requests + used


class InstancePicker:
    """Stateless apart from its random generator; give it the records to choose from."""

    def __init__(self, config: PolicyConfig | None = None, rng: random.Random | None = None):
        self.config = config or PolicyConfig()
        self.rng = rng or random.Random()

    def pick_prefill(
        self, records: list[InstanceRecord], *, exclude: Collection[str] = ()
    ) -> InstanceRecord:
        candidates = [r for r in records if r.role is Role.PREFILL and r.instance_id not in exclude]
        if not candidates:
            raise NoCapacityError(_none_left("prefill", records, Role.PREFILL, exclude))
        return self._choose(
            candidates, prefill_load, self.config.prefill_policy, self.config.prefill_window_tokens
        )

    def pick_decode(
        self,
        records: list[InstanceRecord],
        *,
        num_tokens: int = 0,
        role: Role = Role.DECODE,
        exclude: Collection[str] = (),
    ) -> InstanceRecord:
        """A `role` instance (decode, or mixed) with free KV blocks for `num_tokens` tokens."""
        candidates = [
            r
            for r in records
            if r.role is role
            and r.instance_id not in exclude
            and r.free_kv_blocks >= math.ceil(num_tokens / r.block_size)
        ]
        if not candidates:
            what = f"{role.value} instance with KV blocks free for {num_tokens} tokens"
            raise NoCapacityError(_none_left(what, records, role, exclude))
        return self._choose(
            candidates, decode_load, self.config.decode_policy, self.config.decode_window_requests
        )

    def _choose(
        self,
        candidates: list[InstanceRecord],
        load: Callable[[InstanceRecord], float],
        policy: RoutingPolicy,
        window: float,
    ) -> InstanceRecord:
        if policy is RoutingPolicy.RANDOM:
            return self.rng.choice(candidates)
        best = min(load(r) for r in candidates)
        limit = best + window + self.config.window_fraction * best
        return self.rng.choice([r for r in candidates if load(r) <= limit])


def _none_left(
    what: str, records: list[InstanceRecord], role: Role, exclude: Collection[str]
) -> str:
    of_role = [r for r in records if r.role is role]
    excluded = sum(r.instance_id in exclude for r in of_role)
    return (
        f"no {what} is available ({len(of_role)} live {role.value} instance(s), "
        f"{excluded} excluded after failures); retry later or add {role.value} replicas"
    )


class RouterSnapshot:
    """The live records of one application, refreshed in the background."""

    def __init__(
        self,
        store: InstanceStore,
        *,
        picker: InstancePicker | None = None,
        refresh_interval_s: float | None = None,
        refresh_timeout_s: float | None = None,
    ):
        self.store = store
        self.picker = picker or InstancePicker()
        self.refresh_interval_s = refresh_interval_s or store.ttl_s / 4
        if self.refresh_interval_s >= store.ttl_s:
            raise ValueError(
                f"refresh_interval_s ({self.refresh_interval_s}) must be below the TTL "
                f"({store.ttl_s}s), or routers see instances that are gone"
            )
        self.refresh_timeout_s = refresh_timeout_s or 2 * getattr(store, "timeout_s", 1.0)
        self.outage = RedisOutage("router snapshot")
        self._records: list[InstanceRecord] = []
        self._task: asyncio.Task | None = None
        self._reading: asyncio.Future | None = None  # the refresh in flight, shared

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="pdray-router-snapshot")

    async def stop(self) -> None:
        for task in (self._task, self._reading):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._reading = None

    async def __aenter__(self) -> RouterSnapshot:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def refresh(self) -> list[InstanceRecord]:
        """Re-read the records; on a Redis error or past refresh_timeout_s keep the old ones."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        await asyncio.shield(self._reading)  # a caller that leaves does not cancel the others'
        return self._records

    async def _read(self) -> None:
        try:
            records = await asyncio.wait_for(self.store.snapshot(), self.refresh_timeout_s)
        except TimeoutError:
            self.outage.failed(TimeoutError(f"no snapshot within {self.refresh_timeout_s:g} s"))
            return
        except Exception as e:  # Redis down: keep the records, they age out by time_s
            self.outage.failed(e)
            return
        self.outage.recovered()
        self._records = records

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # refresh() raises nothing it expects; the loop must live on
                logger.exception("refreshing the instance snapshot failed")

    def records(self, role: Role | None = None) -> list[InstanceRecord]:
        """Records that are fresh (heartbeat within the TTL) and not marked down."""
        oldest_s = time.time() - self.store.ttl_s
        return [
            r
            for r in self._records
            if r.time_s > oldest_s
            and not self.store.is_down(r.instance_id)
            and (role is None or r.role is role)
        ]

    def pick_prefill(self, *, exclude: Collection[str] = ()) -> InstanceRecord:
        return self.picker.pick_prefill(self.records(Role.PREFILL), exclude=exclude)

    def pick_decode(
        self, *, num_tokens: int = 0, role: Role = Role.DECODE, exclude: Collection[str] = ()
    ) -> InstanceRecord:
        return self.picker.pick_decode(
            self.records(role), num_tokens=num_tokens, role=role, exclude=exclude
        )

    async def mark_down(self, instance_id: str) -> None:
        """An instance failed a call: never pick it again until it heartbeats after down_s."""
        self._records = [r for r in self._records if r.instance_id != instance_id]
        try:
            await self.store.mark_down(instance_id)
        except Exception as e:  # the local blacklist is set before Redis is called
            logger.warning("deleting the record of %s failed: %s", instance_id, e)
