"""The app's private redis-server dies with the app on every way of stopping it: SIGTERM to
`serve run` (how systemd and Kubernetes stop a process), SIGINT (Ctrl-C), `serve shutdown` and
then the end of `serve run`, and its owner (the RedisHost replica) SIGKILLed, after which Serve's
replacement serves on the same port and the replicas' records come back.

Each test runs the real `serve` CLI on a copy of serve_config.yaml (dummy:tiny on CPU, its own
HTTP port) and finds the app's redis-server among the processes descended from the Ray instance
it runs on, by pid and port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import redis
import yaml

from pdray.router.redis_server import free_port

pytest.importorskip("ucxx")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

REPO = Path(__file__).resolve().parents[2]
SERVE_CLI = Path(sys.executable).parent / "serve"
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60


# -- processes -----------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, comm, start time) of every live (not zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), comm, fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of the live processes below `root`."""
    table = _processes()
    found = {}
    for pid, (ppid, _, start) in table.items():
        p = ppid
        while p > 1 and p != root and p in table:
            p = table[p][0]
        if p == root and pid != root:
            found[pid] = start
    return found


def _redis_servers(root: int) -> dict[int, int]:
    """pid -> port of the redis-servers below `root`."""
    table = _processes()
    servers = {}
    for pid in _descendants(root):
        if pid in table and table[pid][1].startswith("redis-server"):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            match = re.search(r":(\d+)", cmdline)  # redis titles itself "redis-server host:port"
            if match:
                servers[pid] = int(match.group(1))
    return servers


def _alive(pid: int, start: str | None = None) -> bool:
    entry = _processes().get(pid)
    return entry is not None and (start is None or entry[2] == start)


def _wait(what: str, predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def _kill_leftovers(started: dict[int, str]) -> None:
    """SIGKILL what this test started and is still running (a failed test leaks nothing)."""
    for pid, start in started.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- the app -------------------------------------------------------------------------------------


def _config(tmp_path: Path) -> tuple[Path, int]:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    http_port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    args = config["applications"][0]["args"]
    args.update(device="cpu", scheduler_ttl_s=3)
    assert args["redis_url"] is None  # the private Redis is the point
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, http_port


def _serve_run(config: Path, address: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(SERVE_CLI), "run", "--address", address, str(config)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def _complete(http_port: int) -> bool:
    body = json.dumps({"model": "dummy:tiny", "prompt": [5, 6, 7], "max_tokens": 2}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 200 and bool(json.loads(response.read())["choices"])
    except OSError:
        return False


def _wait_ready(proc: subprocess.Popen, http_port: int, root: int, log: Path) -> tuple[int, int]:
    """Until a completion succeeds; the (pid, port) of the app's one redis-server."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _complete(http_port):
            servers = _redis_servers(root)
            assert len(servers) == 1, f"one private redis-server expected, found {servers}"
            return next(iter(servers.items()))
        time.sleep(1)
    raise AssertionError("the app did not start:\n" + log.read_text()[-4000:])


def _records(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2) as client:
        return len(client.keys("pdray:*:instance:*"))


def _assert_gone(pid: int, port: int, what: str, *, port_closed: bool = True) -> None:
    _wait(
        f"redis-server {pid} (port {port}) gone after {what}",
        lambda: not _alive(pid),
        STOP_TIMEOUT_S,
    )
    if port_closed:
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(port=port, socket_connect_timeout=1).ping()


# -- serve run on its own Ray instance: SIGTERM, SIGINT -------------------------------------------


@pytest.mark.timeout(START_TIMEOUT_S + 3 * STOP_TIMEOUT_S)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_stopping_serve_run_stops_the_private_redis(tmp_path, how):
    """`serve run` starts its own Ray instance (address "local": never someone else's); SIGTERM
    goes to `serve run` alone, SIGINT to its process group, as Ctrl-C in a terminal does."""
    config, http_port = _config(tmp_path)
    log = tmp_path / "serve.log"
    proc = _serve_run(config, "local", log)
    started: dict[int, str] = {}
    try:
        pid, port = _wait_ready(proc, http_port, proc.pid, log)
        started = _descendants(proc.pid)
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(STOP_TIMEOUT_S)
        _assert_gone(pid, port, f"{how} to serve run")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_leftovers(started)


# -- serve run on a Ray instance of this test: owner SIGKILLed, serve shutdown --------------------


@pytest.fixture
def ray_head():
    """A Ray instance of this process, with a dashboard (what `serve shutdown` talks to)."""
    dashboard_port = free_port()
    context = ray.init(
        address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
    )  # fmt: skip
    yield context.address_info["gcs_address"], f"http://127.0.0.1:{dashboard_port}"
    ray.shutdown()


@pytest.mark.timeout(2 * START_TIMEOUT_S + 3 * STOP_TIMEOUT_S)
def test_owner_killed_then_serve_shutdown_leave_no_redis(tmp_path, ray_head):
    """SIGKILL the RedisHost replica: its redis-server dies with it; Serve's replacement starts
    one on the same port, the replicas' heartbeats re-create their records and requests are
    served. Then `serve shutdown` stops that one, and ending `serve run` leaves none."""
    gcs_address, dashboard = ray_head
    config, http_port = _config(tmp_path)
    log = tmp_path / "serve.log"
    before = set(_redis_servers(os.getpid()))
    root = os.getpid()  # the Ray instance's processes are this process's children
    proc = _serve_run(config, gcs_address, log)
    try:
        pid, port = _wait_ready(proc, http_port, root, log)
        assert pid not in before
        owner = _processes()[pid][0]
        owner_cmdline = Path(f"/proc/{owner}/cmdline").read_bytes()
        assert b"RedisHost" in owner_cmdline, owner_cmdline  # the replica's Ray worker
        os.kill(owner, signal.SIGKILL)
        # (its replacement may already listen on the port)
        _assert_gone(pid, port, "its owner was SIGKILLed", port_closed=False)

        def replacement():
            servers = {p: q for p, q in _redis_servers(root).items() if p not in before}
            return next((p for p, q in servers.items() if q == port), None)

        new_pid = _wait("a replacement redis-server on the same port", replacement, 120)
        _wait("both replicas' records back in the new Redis", lambda: _records(port) == 2, 60)
        _wait("a completion after the restart", lambda: _complete(http_port), 60, 1)

        result = subprocess.run(
            [str(SERVE_CLI), "shutdown", "--address", dashboard, "--yes"],
            capture_output=True, text=True, timeout=STOP_TIMEOUT_S,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        _assert_gone(new_pid, port, "serve shutdown")
        os.killpg(proc.pid, signal.SIGINT)  # ending serve run, as Ctrl-C does
        proc.wait(STOP_TIMEOUT_S)
        assert set(_redis_servers(root)) <= before
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
