"""Deadlines on the requests a replica runs for a router, so that no request outlives its caller.

The router enforces `request_timeout_s` itself and aborts a late request on its instances. But a
router that dies cannot: Ray does not cancel the streaming calls of a dead caller, so its requests
would decode on to max_tokens, and a reserved request whose stream was never opened would hold its
blocks for good. Each replica therefore also gives every request `request_timeout_s` plus a grace
from its arrival, and aborts it when that passes (a reaper thread, once a second).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

GRACE_S = 30.0  # past the router's own deadline, which acts first while the router lives


class CallerDeadlines:
    def __init__(
        self,
        timeout_s: float,
        abort: Callable[[str], None],
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.timeout_s = timeout_s + grace_s
        self._abort = abort
        self._clock = clock
        self._deadlines: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, request_id: str) -> None:
        with self._lock:
            self._deadlines.setdefault(request_id, self._clock() + self.timeout_s)

    def end(self, request_id: str) -> None:
        with self._lock:
            self._deadlines.pop(request_id, None)

    def reap(self) -> list[str]:
        """Abort every request past its deadline; their ids."""
        now = self._clock()
        with self._lock:
            late = [r for r, deadline in self._deadlines.items() if now > deadline]
            for request_id in late:
                del self._deadlines[request_id]
        for request_id in late:
            logger.warning(
                "request %s outlived request_timeout_s + %.0f s here (its router is gone?): "
                "aborting it", request_id, GRACE_S,
            )  # fmt: skip
            self._abort(request_id)
        return late

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """The reaper thread's body: reap until `stop` is set."""
        while not stop.wait(interval_s):
            try:
                self.reap()
            except Exception:  # an abort that failed must not end the reaper
                logger.exception("aborting a late request failed")

    def __len__(self) -> int:
        return len(self._deadlines)
