"""The process's UCX: one ucxx context and one event-loop thread ("pdray-ucx") where every ucxx call
of every UcxTransport runs. Started by the first `get_runtime`, with that call's UCX options; it
lives until the process exits (later transports share it; other options are refused).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import sys
import threading

from pdray.kv_transfer.base import TransferError

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets variables this UCX never reads
try:
    import ucxx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the ucx KV transport needs ucxx: pip install 'pdray[ucx]'") from e


def default_host(net_devices: list[str] | None) -> str:
    """The address peers reach this host at: that of the first of `net_devices` with one, else
    the default interface's, else loopback."""
    for device in net_devices or []:
        try:
            return ucxx.get_address(ifname=device.split(":")[0])
        except OSError:
            pass
    try:
        return ucxx.get_address()
    except OSError:
        return "127.0.0.1"


class UcxRuntime:
    """The process's UCX context and the thread whose asyncio loop runs every ucxx call."""

    def __init__(self, options: dict[str, str]):
        self.options = options
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="pdray-ucx", daemon=True).start()
        try:
            self.run(self._init(), 60.0, "UCX initialisation")
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    async def _init(self) -> None:
        # python futures: requests complete through a notifier thread instead of a busy loop
        ucxx.init(options=self.options, progress_mode="thread", enable_python_future=True)
        self.worker = ucxx.core._get_ctx().worker

    def stop_notifier(self, timeout_s: float) -> None:
        """Ask ucxx's notifier thread to end and wait up to `timeout_s` for it (at exit only:
        Python futures of later requests would never complete). Not ucxx's own
        `stop_notifier_thread`: it waits for the thread with no deadline."""
        ctx = ucxx.core._ctx
        thread = getattr(ctx, "notifier_thread", None)
        if thread is None:
            return
        ctx.notifier_thread_q.put("shutdown")
        self.worker.stop_request_notifier_thread()  # wakes its wait now, not after its period
        thread.join(timeout_s)
        if thread.is_alive():
            print(
                f"pdray: ucxx's notifier thread did not stop within {timeout_s:g} s at exit",
                file=sys.stderr,
            )
        else:
            ctx.notifier_thread = None

    def run(self, coro, timeout_s: float, what: str):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own timeout (the same class since Python 3.11)
                raise
            future.cancel()
            raise TransferError(f"{what} timed out after {timeout_s:g} s") from None


_runtime: UcxRuntime | None = None
_runtime_lock = threading.Lock()
_exiting = False


@atexit.register
def _at_exit() -> None:
    """Stop ucxx's request-notifier thread while the interpreter can still run it. Left running,
    it wakes (once a second) into a finalizing interpreter, whose GIL ends it with a forced unwind
    through ucxx's C++ frames, and glibc aborts the process ("FATAL: exception not rethrown")
    after all its work was done."""
    global _exiting
    _exiting = True
    if _runtime is not None:
        _runtime.stop_notifier(timeout_s=5.0)


def is_exiting() -> bool:
    """Whether the interpreter is exiting (connections it cuts are no news)."""
    return _exiting


def get_runtime(options: dict[str, str]) -> UcxRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            try:
                _runtime = UcxRuntime(options)
            except ucxx.exceptions.UCXError as e:
                raise ValueError(f"UCX rejected the options {options}: {e}") from e
        elif options and options != _runtime.options:
            raise ValueError(
                f"UCX is already set up in this process with {_runtime.options}; every "
                f"UcxTransport of a process shares it, so {options} cannot apply"
            )
        return _runtime
