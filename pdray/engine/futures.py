"""Answering a caller from an engine thread.

A caller on an event loop awaits `asyncio.wrap_future(future)`; when its task is cancelled (the
client left), the future is cancelled too, and `set_result` on it would raise InvalidStateError
in the engine thread and kill it. `settle` delivers only to a caller still waiting.
"""

from __future__ import annotations

import concurrent.futures


def settle(
    future: concurrent.futures.Future | None, result=None, error: BaseException | None = None
) -> None:
    """Give `future` its result (or `error`) unless it was cancelled; None: nobody waits."""
    if future is None or not future.set_running_or_notify_cancel():
        return  # cancelled: the caller left; running the command was still right
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
