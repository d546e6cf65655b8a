"""A tensor-parallel engine's setup and teardown never hang (CPU, gloo, two ranks).

Each scenario that hung on the old code (a plain script without a `__main__` guard; a second
engine in one process; a follower that fails to start; close with a stuck follower) runs under a
deadline (a subprocess timeout, or the test's own timeout), so a regression fails instead of
stalling the suite. Errors name the rank and how it ended.

On GPUs `PDRAY_TP_TEST_DEVICE=cuda` runs the in-process cases (a killed follower, close with a
stuck follower, an engine dropped without close) over NCCL, one rank per GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_parity import greedy, make_prompts, new_llm

from pdray import LLM, SamplingParams
from pdray.worker import tp_group
from pdray.worker.tp_group import TensorParallelError

TESTS = Path(__file__).resolve().parent
DEVICE = os.environ.get("PDRAY_TP_TEST_DEVICE", "cpu")


def tp_llm(path, **kwargs) -> LLM:
    """A TP=2 engine on DEVICE (on CUDA: float32, CUDA graphs on, NCCL with two GPUs)."""
    engine = {"device": DEVICE, "dtype": "float32", "tensor_parallel_size": 2}
    if DEVICE != "cpu":
        engine.update(block_size=16, num_kv_blocks=256)
    return LLM(str(path), **engine, **kwargs)


def script_env() -> dict:
    """This process's environment with the tests folder and this process's import path."""
    path = [str(TESTS), *(p for p in sys.path if p)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def run_script(tmp_path: Path, body: str, timeout_s: float = 180) -> str:
    """Run `body` as a plain script (no __main__ guard) in a fresh interpreter; its stdout."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s,
        env=script_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def wait_gone(pids, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


@pytest.mark.timeout(240)
def test_plain_script_without_main_guard(checkpoint, tmp_path):
    """Followers are fresh `python -m` processes: a script that builds a TP engine at top level
    runs, matches TP=1, and exits without close() (the engine is closed at interpreter exit)."""
    path = checkpoint("llama3")
    expected = greedy(new_llm(path), make_prompts(seed=11))
    out = run_script(tmp_path, f"""
        from test_parity import greedy, make_prompts, new_llm
        llm = new_llm({str(path)!r}, tensor_parallel_size=2)
        print("TOKENS", greedy(llm, make_prompts(seed=11)))
        print("FOLLOWERS", [f.pid for f in llm.engine.runner.tp_group.followers])
    """)  # fmt: skip
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert eval(lines["TOKENS"]) == expected
    assert wait_gone(eval(lines["FOLLOWERS"]), 10) == []


@pytest.mark.timeout(240)
def test_two_engines_in_one_process(checkpoint, tmp_path):
    """Each engine has its own process group: two TP engines run side by side, and one dropped
    without close() stops its followers when it is collected."""
    path = checkpoint("llama3")
    prompts = make_prompts(seed=12)
    expected = greedy(new_llm(path), prompts)
    out = run_script(tmp_path, f"""
        import gc
        from test_parity import greedy, make_prompts, new_llm
        prompts = make_prompts(seed=12)
        a = new_llm({str(path)!r}, tensor_parallel_size=2)
        print("A", greedy(a, prompts))
        b = new_llm({str(path)!r}, tensor_parallel_size=2)
        print("B", greedy(b, prompts))
        print("A_AGAIN", greedy(a, prompts))
        print("A_FOLLOWERS", [f.pid for f in a.engine.runner.tp_group.followers])
        a = None  # dropped without close()
        gc.collect()
        c = new_llm({str(path)!r}, tensor_parallel_size=2)
        print("C", greedy(c, prompts))
        print("B_AGAIN", greedy(b, prompts))
    """)  # fmt: skip
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    for key in ("A", "B", "A_AGAIN", "C", "B_AGAIN"):
        assert eval(lines[key]) == expected, key
    assert wait_gone(eval(lines["A_FOLLOWERS"]), 10) == []


@pytest.mark.timeout(120)
def test_follower_that_cannot_start_is_named_at_once(checkpoint, monkeypatch):
    """A follower process that exits before it connects: the engine's constructor raises with
    its rank and exit code, long before the join deadline."""
    monkeypatch.setattr(
        tp_group, "follower_command", lambda address, rank: [sys.executable, "-c", "exit(3)"]
    )
    monkeypatch.setattr(tp_group, "JOIN_TIMEOUT_S", 600.0)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(process\) exited with code 3 before"):
        new_llm(checkpoint("llama3"), tensor_parallel_size=2)
    assert time.monotonic() - start < 60


_FAILING_FOLLOWER = """
import sys
import pdray.worker.model_runner as model_runner
def fail(self, config):
    raise MemoryError("rank 1 cannot hold its shard")
model_runner.ModelRunner.__init__ = fail
from pdray.worker import tp_follower
sys.exit(tp_follower.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_follower_that_fails_after_joining_is_named_with_its_exception(checkpoint, monkeypatch):
    """A follower that joins, then raises while building its shard: rank 0 (waiting for it to
    be ready) raises with the rank and the follower's exception."""
    monkeypatch.setattr(
        tp_group, "follower_command",
        lambda address, rank: [sys.executable, "-c", _FAILING_FOLLOWER, *map(str, address),
                               str(rank)],
    )  # fmt: skip
    monkeypatch.setattr(tp_group, "READY_TIMEOUT_S", 600.0)
    with pytest.raises(TensorParallelError, match="rank 1 .*cannot hold its shard"):
        new_llm(checkpoint("llama3"), tensor_parallel_size=2)


@pytest.mark.timeout(120)
def test_close_with_a_stuck_follower_returns(checkpoint, monkeypatch):
    """A follower that never answers the stop command (SIGSTOP) is killed after STOP_TIMEOUT_S:
    close returns."""
    monkeypatch.setattr(tp_group, "STOP_TIMEOUT_S", 2.0)
    llm = tp_llm(checkpoint("llama3"))
    follower = llm.engine.runner.tp_group.followers[0]
    os.kill(follower.pid, signal.SIGSTOP)
    llm.close()
    assert follower.exit_status() == "was killed by SIGKILL (exit code -9)"


@pytest.mark.timeout(120)
def test_followers_exit_when_rank0_dies(checkpoint, tmp_path):
    """rank 0 killed outright (no close, no atexit): its followers notice the closed connection
    and exit within seconds instead of waiting for commands forever."""
    path = checkpoint("llama3")
    script = tmp_path / "leader.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from test_parity import new_llm
        llm = new_llm({str(path)!r}, tensor_parallel_size=2)
        print([f.pid for f in llm.engine.runner.tp_group.followers], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90,
        env=script_env(),
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-4000:]
    assert wait_gone(eval(done.stdout.strip()), 10) == []


@pytest.mark.timeout(240)
def test_engine_dropped_without_close_stops_its_followers(checkpoint, tmp_path):
    """Collected without close(): the finalizer frees the CUDA graphs, then stops the group. In
    a subprocess, so even a hang that holds the GIL fails the test instead of stalling it."""
    path = checkpoint("llama3")
    out = run_script(tmp_path, f"""
        import gc
        from test_tensor_parallel_lifecycle import greedy, make_prompts, tp_llm
        llm = tp_llm({str(path)!r})
        greedy(llm, make_prompts(seed=13))
        print("FOLLOWERS", [f.pid for f in llm.engine.runner.tp_group.followers], flush=True)
        del llm
        gc.collect()
        print("COLLECTED ok", flush=True)
    """, timeout_s=180)  # fmt: skip
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["COLLECTED"] == "ok"
    assert wait_gone(eval(lines["FOLLOWERS"]), 10) == []


def _sum_ranks(runner, scale: float):
    """On every rank: all-reduce (rank + 1) * scale over the engine's own collectives."""
    import torch

    from pdray.worker.parallel import all_reduce, bound

    with bound(runner.tp):
        return all_reduce(torch.full((3,), (runner.tp.rank + 1) * scale)).tolist()


@pytest.mark.timeout(120)
def test_run_together_runs_a_collective_on_every_rank(checkpoint):
    with new_llm(checkpoint("llama3"), tensor_parallel_size=2) as llm:
        runner = llm.engine.runner
        assert runner.tp_group.run_together(_sum_ranks, runner, 2.0) == [6.0, 6.0, 6.0]


@pytest.mark.timeout(180)
def test_follower_killed_while_generating(checkpoint):
    """A follower killed in the middle of a long generation: generate raises, naming the rank
    and its signal, within seconds (the watchdog; on NCCL it aborts the communicator so rank 0's
    kernels waiting on the lost peer return); close afterwards returns."""
    import threading

    llm = tp_llm(checkpoint("llama3"))
    follower = llm.engine.runner.tp_group.followers[0]
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    steps = []

    def kill_once_running():
        while len(steps) < 5:  # outputs are streaming: the step loop is running
            time.sleep(0.01)
        os.kill(follower.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_running, daemon=True)
    killer.start()
    engine = llm.engine
    engine.add_request("long", list(range(5, 40)), params)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(process\) was killed by SIGKILL"):
        while engine.has_unfinished_requests():
            steps.append(engine.step())
    assert time.monotonic() - start < 60
    llm.close()
