"""Instance records in Redis: who serves, where, and how loaded.

Lifecycle of a record: each replica writes its `InstanceRecord` every heartbeat with
`SET <prefix><instance_id> <json> PX <ttl>`; a replica that stops heartbeating disappears when
the TTL runs out, and `remove()` deletes it at once on a clean shutdown. Routers read all
records with SCAN + MGET (`snapshot()`); a record that expires between the two is skipped. A
router that fails to reach an instance calls `mark_down()`: the record is deleted and the
instance is kept out of this store's snapshots for `down_s`, even if it heartbeats again.

Every Redis call has a deadline (`connect`: connect and read within `timeout_s`, one immediate
retry so that a pooled connection that died with a restarted server reconnects), so an
unreachable Redis costs a caller at most about 2 x timeout_s per call, never a hang.
`RedisOutage` logs an outage once when it starts, then every `repeat_s`, and when it ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdray.config import Role

logger = logging.getLogger(__name__)

_SCAN_COUNT = 256
REDIS_TIMEOUT_S = 1.0  # per Redis call (connect, read); routing state is small and local


def connect(url: str, timeout_s: float = REDIS_TIMEOUT_S, *, asyncio: bool = False, **kwargs):
    """A redis-py client (`redis.asyncio` with asyncio=True) whose calls have a deadline."""
    from redis.backoff import NoBackoff

    if asyncio:
        import redis.asyncio as client_module
        from redis.asyncio.retry import Retry
    else:
        import redis as client_module
        from redis.retry import Retry
    return client_module.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        **kwargs,
    )


class RedisOutage:
    """Logs a Redis outage as a warning when it starts and every `repeat_s` while it lasts, and
    its end; `error` is the last failure (None while Redis answers)."""

    def __init__(self, what: str, repeat_s: float = 60.0):
        self.what = what
        self.repeat_s = repeat_s
        self.error: str | None = None
        self.since_s: float | None = None  # time.monotonic() of the first failure
        self._logged_s = 0.0

    def failed(self, e: BaseException) -> None:
        now = time.monotonic()
        self.error = f"{type(e).__name__}: {e}"
        if self.since_s is None:
            self.since_s = now
        if self._logged_s <= self.since_s or now - self._logged_s >= self.repeat_s:
            self._logged_s = now
            logger.warning(
                "%s: Redis unreachable for %.0f s (%s); retrying", self.what, now - self.since_s,
                self.error,
            )  # fmt: skip

    def recovered(self) -> None:
        if self.since_s is not None:
            logger.warning(
                "%s: Redis answers again after %.0f s", self.what, time.monotonic() - self.since_s
            )
        self.error = self.since_s = None

    def describe(self) -> str:
        """'' while Redis answers; else how long it has been unreachable, and why."""
        if self.since_s is None:
            return ""
        return f"Redis unreachable for {time.monotonic() - self.since_s:.0f} s ({self.error})"


class InstanceRecord(BaseModel):
    """What one prefill, decode or mixed instance publishes about itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_id: str = Field(min_length=1, description="Unique id of the instance (replica).")
    role: Role = Field(description="prefill, decode or mixed.")
    host: str = Field("", description="Host (IP or name) the instance runs on.")
    node_id: str = Field("", description="Cluster node id (e.g. Ray's), for same-node pairing.")
    address: dict[str, Any] = Field(
        default_factory=dict,
        description="How to reach the instance (e.g. Serve deployment and replica names).",
    )
    kv_transport: dict[str, Any] = Field(
        default_factory=dict, description="KV transport handshake descriptor, as plain JSON."
    )
    queued_prefill_tokens: int = Field(0, ge=0, description="Prompt tokens waiting to prefill.")
    running_requests: int = Field(0, ge=0, description="Requests being decoded (or prefilled).")
    waiting_requests: int = Field(0, ge=0, description="Requests queued, not yet running.")
    free_kv_blocks: int = Field(0, ge=0, description="KV blocks free now.")
    total_kv_blocks: int = Field(0, ge=0, description="KV blocks in the cache.")
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    time_s: float = Field(
        default_factory=time.time, description="Wall-clock time of the heartbeat (Unix seconds)."
    )


def record_key(app_name: str, instance_id: str) -> str:
    """The Redis key of one instance's record (for writers that do not use InstanceStore)."""
    return f"pdray:{app_name}:instance:{instance_id}"


class InstanceStore:
    """Instance records of one application under `pdray:<app_name>:instance:`.

    Uses `redis.asyncio`; every method is a coroutine. One store per event loop.
    """

    def __init__(
        self,
        redis_url: str,
        app_name: str,
        ttl_s: float = 10.0,
        *,
        down_s: float | None = None,
        client: Any = None,
        timeout_s: float = REDIS_TIMEOUT_S,
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if not app_name or ":" in app_name:
            raise ValueError(f"app_name must be non-empty and without ':', got {app_name!r}")
        if client is None:
            client = connect(redis_url, timeout_s, asyncio=True, decode_responses=True)
        self.redis = client
        self.timeout_s = timeout_s
        self.redis_url = redis_url
        self.app_name = app_name
        self.ttl_s = ttl_s
        self.down_s = ttl_s if down_s is None else down_s
        self.prefix = record_key(app_name, "")
        self._down_until_s: dict[str, float] = {}  # instance id -> time.monotonic() deadline

    def key(self, instance_id: str) -> str:
        return record_key(self.app_name, instance_id)

    async def heartbeat(self, record: InstanceRecord) -> None:
        """Write (or refresh) a record; it expires after ttl_s unless written again."""
        await self.redis.set(
            self.key(record.instance_id), record.model_dump_json(), px=max(1, int(self.ttl_s * 1e3))
        )

    async def remove(self, instance_id: str) -> None:
        await self.redis.delete(self.key(instance_id))

    async def mark_down(self, instance_id: str) -> None:
        """Forget an instance that failed a call: delete its record, skip it for down_s."""
        self._down_until_s[instance_id] = time.monotonic() + self.down_s
        await self.redis.delete(self.key(instance_id))

    def is_down(self, instance_id: str) -> bool:
        deadline = self._down_until_s.get(instance_id)
        if deadline is None:
            return False
        if time.monotonic() >= deadline:
            del self._down_until_s[instance_id]
            return False
        return True

    async def snapshot(self) -> list[InstanceRecord]:
        """Every live record not marked down, sorted by instance id."""
        pattern = self.prefix + "*"
        keys = [key async for key in self.redis.scan_iter(match=pattern, count=_SCAN_COUNT)]
        keys = list(dict.fromkeys(keys))  # SCAN may return a key twice
        records = []
        for start in range(0, len(keys), _SCAN_COUNT):
            batch = keys[start : start + _SCAN_COUNT]
            for key, value in zip(batch, await self.redis.mget(batch), strict=True):
                if value is None:  # expired or removed since the scan
                    continue
                try:
                    record = InstanceRecord.model_validate_json(value)
                except ValidationError as e:
                    logger.warning("skipping malformed instance record %s: %s", key, e)
                    continue
                if not self.is_down(record.instance_id):
                    records.append(record)
        return sorted(records, key=lambda r: r.instance_id)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
