"""A replica's deadline on the requests it runs for a router (deployments/caller_deadlines.py):
a request whose router died is aborted once request_timeout_s + the grace has passed; one that
ended, or was aborted by its router, is forgotten."""

from __future__ import annotations

import threading

from pdray.deployments.caller_deadlines import CallerDeadlines


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_requests_past_their_deadline_are_aborted_once():
    clock, aborted = Clock(), []
    deadlines = CallerDeadlines(10.0, aborted.append, grace_s=5.0, clock=clock)
    deadlines.start("orphan")
    deadlines.start("done")
    clock.now = 3.0
    deadlines.start("late-comer")  # its own clock starts now
    deadlines.end("done")  # its stream ended (or its router aborted it)
    clock.now = 15.0
    assert deadlines.reap() == [] and aborted == []  # deadline is start + 15: not past yet
    clock.now = 15.5
    assert deadlines.reap() == ["orphan"] and aborted == ["orphan"]
    clock.now = 18.5
    assert deadlines.reap() == ["late-comer"]
    assert deadlines.reap() == [] and len(deadlines) == 0


def test_a_reserved_request_keeps_its_first_deadline():
    """reserve starts the clock; a later start (e.g. a retried call) does not extend it."""
    clock, aborted = Clock(), []
    deadlines = CallerDeadlines(1.0, aborted.append, grace_s=0.0, clock=clock)
    deadlines.start("r")
    clock.now = 0.9
    deadlines.start("r")
    clock.now = 1.5
    assert deadlines.reap() == ["r"]


def test_the_reaper_survives_a_failing_abort_and_stops():
    calls = []

    def abort(request_id):
        calls.append(request_id)
        raise RuntimeError("engine loop closed")

    deadlines = CallerDeadlines(0.0, abort, grace_s=0.0)
    deadlines.start("a")
    stop = threading.Event()
    reaper = threading.Thread(target=deadlines.run, args=(stop, 0.01))
    reaper.start()
    deadline_hit = threading.Event()
    for _ in range(500):  # until the reaper has tried it (bounded: 5 s)
        if calls:
            deadline_hit.set()
            break
        stop.wait(0.01)
    stop.set()
    reaper.join(5)
    assert deadline_hit.is_set() and calls == ["a"] and not reaper.is_alive()
