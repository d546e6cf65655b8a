"""EngineThread survives callers that left: a command whose awaiting task was cancelled still
runs, its answer is dropped, and the thread keeps serving (it used to die on InvalidStateError,
which took the replica's engine down when a client disconnected at the wrong moment)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from deployments.engine_replica import EngineThread


def test_cancelled_caller_does_not_stop_the_engine_thread():
    engine = SimpleNamespace(has_unfinished_requests=lambda: False, close=lambda: None)
    thread = EngineThread(engine)
    release, ran = threading.Event(), []
    blocker = thread.call(release.wait)  # holds the thread while the next command is queued
    left = thread.call(lambda: ran.append("left"))
    failed = thread.call(lambda: 1 / 0)
    assert left.cancel() and failed.cancel()  # their callers went away
    release.set()
    assert blocker.result(timeout=5) is True
    assert thread.call(lambda: "still serving").result(timeout=5) == "still serving"
    assert ran == ["left"] and thread.alive
    thread.close()


def test_settle_skips_cancelled_futures():
    import concurrent.futures

    from pdray.engine.futures import settle

    cancelled, waiting = concurrent.futures.Future(), concurrent.futures.Future()
    cancelled.cancel()
    settle(cancelled, 1)  # no InvalidStateError
    settle(None, 1)
    settle(waiting, error=ValueError("x"))
    assert isinstance(waiting.exception(timeout=0), ValueError)
