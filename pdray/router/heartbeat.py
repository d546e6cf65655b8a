"""An instance's heartbeat: its InstanceRecord written to Redis every period, in a thread of its own.

Lifecycle of `run_heartbeat` (it blocks the calling thread): resolve the Redis URL (retried each
period until it answers) -> every `period_s` (a third of the TTL by default): make the record ->
`SET key PX ttl` -> `on_record(record)` (also while Redis is unreachable, so metrics stay
current) -> until `stop` is set or `alive()` is false -> `DEL key`, best effort.

Every Redis call has a deadline (`store.connect`); a failure is logged (`RedisOutage`: once when
the outage starts, every minute while it lasts, and when it ends) and retried next period, so a
Redis that restarts gets the record back within one period. No error ends the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pdray.router.store import REDIS_TIMEOUT_S, InstanceRecord, RedisOutage, connect

logger = logging.getLogger(__name__)


def run_heartbeat(
    *,
    key: str,
    ttl_s: float,
    make_record: Callable[[], InstanceRecord],
    redis_url: Callable[[], str],
    stop: threading.Event,
    alive: Callable[[], bool] = lambda: True,
    on_record: Callable[[InstanceRecord], None] | None = None,
    period_s: float | None = None,
    timeout_s: float = REDIS_TIMEOUT_S,
) -> None:
    period_s = period_s or ttl_s / 3
    ttl_ms = max(1, int(ttl_s * 1000))
    outage = RedisOutage(f"heartbeat of {key}")
    client = None
    while alive():  # a dead engine stops heartbeating: its record expires
        record = None
        try:
            record = make_record()
            if client is None:
                client = connect(redis_url(), timeout_s)
            client.set(key, record.model_dump_json(), px=ttl_ms)
            outage.recovered()
        except Exception as e:
            outage.failed(e)
        if record is not None and on_record is not None:
            try:
                on_record(record)
            except Exception as e:
                logger.warning("heartbeat of %s: updating metrics failed: %s", key, e)
        if stop.wait(period_s):
            break
    if client is not None:
        try:
            client.delete(key)
        except Exception as e:  # Redis down at shutdown: the record expires after the TTL
            logger.warning("heartbeat of %s: deleting the record failed: %s", key, e)
        client.close()
