"""A tensor-parallel group: rank 0 is the engine's own ModelRunner; ranks 1..N-1 follow it.

  rank 0 (the engine's process)                 rank r (a follower: `python -m
                                                pdray.worker.tp_follower` offline, a Ray actor
                                                in the replica's placement group under Serve)
  TensorParallelGroup(config): listen, start    connect, ("hello", r, token)
  followers, accept each  <------------------
  ("init", config, store)  ------------------>  join the collectives' process group
  join the process group (rank 0)               ModelRunner builds its shard of the model
  ModelRunner builds its shard; wait_ready <--  ("ready",)
  per call: (target, name, args, reply) ----->  run it: forward without sampling, KV commands...
            gather <--------------------------  ("result", value) when reply
  close: None -> wait for the exit, else kill   exit

Commands travel on one TCP connection per follower (pdray/worker/tp_channel.py); the model's
collectives on a process group built for this engine alone from its own TCPStore (NCCL on GPU,
gloo on CPU), never torch.distributed's default group: two engines in one process do not meet.

Nothing waits forever. Every setup step has a deadline (the constants below); a watchdog thread
notices a follower that exits, before or after joining, and the next call raises an error naming
its rank and exit code or exception (on NCCL it also aborts the communicator, so kernels stuck on
the lost peer return). A follower exits when rank 0's connection closes, so it never outlives
its engine. Close sends the stop command, gives each follower STOP_TIMEOUT_S, kills what is
left and aborts the communicator instead of NCCL's orderly destroy (which waits on the peers).

Followers never re-import the user's script: offline they are fresh `python -m` processes, so a
plain script without `if __name__ == "__main__":` works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdray.config import EngineConfig
from pdray.worker.parallel import Collectives, TensorParallel, bound
from pdray.worker.tp_channel import SEND_TIMEOUT_S, Channel, PeerGone, accept, wait_until

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 120.0  # a follower starts (imports torch) and connects
READY_TIMEOUT_S = 1800.0  # every follower has built its shard of the model (loaded its weights)
REPLY_TIMEOUT_S = 600.0  # a command with a reply (graph capture, a KV hand-off) answers
STOP_TIMEOUT_S = 10.0  # a follower exits after the stop command, else it is killed
RENDEZVOUS_TIMEOUT_S = 60.0  # the collectives' process group forms (its store's deadline)
COLLECTIVE_TIMEOUT_S = 120.0  # one collective's wait for its peers: a backstop to the watchdog
WATCH_INTERVAL_S = 0.5


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine failed, exited or did not answer in time."""


class RankError(RuntimeError):
    """A follower's command with a reply failed; `gather` raises it on rank 0."""


def _device_for(config: EngineConfig, rank: int) -> None:
    if config.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())


def check_shardable(arch, size: int) -> None:
    """Raise before any process starts if the model cannot be split over `size` ranks."""
    checks = [
        (arch.num_heads % size == 0, f"attention heads ({arch.num_heads})"),
        (arch.num_kv_heads % size == 0 or size % arch.num_kv_heads == 0,
         f"KV heads ({arch.num_kv_heads}) (nor does it divide it)"),
        (arch.intermediate_size % size == 0, f"intermediate size ({arch.intermediate_size})"),
    ]  # fmt: skip
    for ok, what in checks:
        if not ok:
            raise ValueError(f"{what} is not divisible by tensor_parallel_size ({size})")


def collective_backend(config: EngineConfig) -> str:
    """NCCL on GPU, gloo on CPU, unless `tensor_parallel_backend` names one (gloo on GPU lets the
    ranks share one GPU, which NCCL refuses)."""
    if config.tensor_parallel_backend != "auto":
        return config.tensor_parallel_backend
    return "nccl" if config.device != "cpu" and torch.cuda.is_available() else "gloo"


def join_collectives(config: EngineConfig, rank: int, store: dist.Store) -> TensorParallel:
    """This rank's TensorParallel over a process group of its own, formed through `store`."""
    _device_for(config, rank)
    kind = collective_backend(config)
    size = config.tensor_parallel_size
    prefixed = dist.PrefixStore(f"pdray-tp/{kind}", store)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    fast = None
    if kind == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        backend = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        # opt-in: faster than NCCL at 8 KB in a graph (16.2 vs 20.1 us), far slower at 512 KB
        # (509 vs 21 us) on two H200s; docs/performance.md
        if os.environ.get("PDRAY_PEER_ALL_REDUCE") == "1":
            from pdray.kernels.all_reduce import setup_peer_all_reduce

            device = torch.device("cuda", torch.cuda.current_device())
            fast, error = setup_peer_all_reduce(rank, size, device, prefixed)
            if fast is None:
                logger.warning("rank %d: peer all-reduce off (%s); NCCL for every size", rank,
                               error or "another rank could not set it up")  # fmt: skip
    elif kind == "gloo":
        backend = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
    else:
        raise ValueError(f"tensor_parallel_backend {kind!r}: use 'auto', 'nccl' or 'gloo'")
    return TensorParallel(rank, size, Collectives(backend, kind, fast))


# -- a follower rank ------------------------------------------------------------------------------


def follow(address: tuple[str, int], rank: int, token: str) -> None:
    """Body of a follower rank: join rank 0 at `address`, build this rank's shard, run rank 0's
    commands until the stop command (None); exit the process if rank 0's end closes."""
    from pdray.worker.model_runner import ModelRunner

    channel = Channel.connect(address, "tensor-parallel rank 0", JOIN_TIMEOUT_S)
    stopping = threading.Event()
    threading.Thread(
        target=_exit_when_closed, args=(channel, stopping, rank), daemon=True,
        name=f"pdray-tp{rank}-watch",
    ).start()  # fmt: skip
    targets = {}
    try:
        channel.send(("hello", rank, token))
        _, config, store_address = channel.recv(JOIN_TIMEOUT_S)
        store = dist.TCPStore(
            *store_address, config.tensor_parallel_size, False,
            timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
        )  # fmt: skip
        tp = join_collectives(config, rank, store)
        with bound(tp):
            targets["runner"] = ModelRunner(config)
            channel.send(("ready",))
            _serve(channel, targets, rank, stopping)
    except PeerGone:
        logger.warning("tensor-parallel rank %d: rank 0 went away; exiting", rank)
    except BaseException as e:
        with contextlib.suppress(OSError):
            channel.send(("fatal", f"{type(e).__name__}: {e}"), timeout_s=5)
        raise
    finally:
        stopping.set()
        for target in reversed(list(targets.values())):
            close = getattr(target, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        # No abort of this rank's communicator: the process exits next (an actor is killed by
        # rank 0), and a peer's clean abort while rank 0 still holds CUDA graphs with NCCL
        # kernels made rank 0's own abort hang on two H200s.
        channel.close()


def _serve(channel: Channel, targets: dict, rank: int, stopping: threading.Event) -> None:
    runner = targets["runner"]
    while True:
        message = channel.recv(None)  # idle until rank 0 sends; its end closing ends the wait
        if message is None:
            stopping.set()
            return
        target, name, args, reply = message
        try:
            if name == _CREATE:  # args: (class, its arguments after the runner)
                targets[target], result = args[0](runner, *args[1:]), None
            else:
                result = getattr(targets[target], name)(*args)
        except Exception as e:
            if not reply:
                raise
            result = RankError(f"tensor-parallel rank {rank}: {type(e).__name__}: {e}")
        if reply:
            channel.send(("result", result))


def _exit_when_closed(channel: Channel, stopping: threading.Event, rank: int) -> None:
    """A follower blocked in a collective cannot read its connection: when rank 0 is gone, end
    the process from here (NCCL would wait for the lost peer until its timeout)."""
    while not stopping.wait(WATCH_INTERVAL_S):
        if channel.peer_closed() and not stopping.is_set():
            logger.error("tensor-parallel rank %d: rank 0's connection closed; exiting", rank)
            os._exit(1)


_CREATE = "__create__"


# -- rank 0's handles on its followers ------------------------------------------------------------


def follower_command(address: tuple[str, int], rank: int) -> list[str]:
    """The command line of an offline follower process (a fresh interpreter: it never imports
    the user's script, so no `__main__` guard is needed)."""
    host, port = address
    return [sys.executable, "-m", "pdray.worker.tp_follower", host, str(port), str(rank)]


class _ProcessFollower:
    """A follower rank in a child process (offline engines)."""

    def __init__(self, rank: int, address: tuple[str, int], token: str):
        self.name = f"tensor-parallel rank {rank} (process)"
        # the parent's import path, so the child imports pdray (and whatever the config names)
        # from where the parent does
        path = os.pathsep.join(p for p in sys.path if p)
        env = dict(os.environ, PDRAY_TP_TOKEN=token, PYTHONPATH=path)
        self.process = subprocess.Popen(
            follower_command(address, rank), env=env, stdin=subprocess.DEVNULL
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_status(self) -> str | None:
        """None while it runs; how it ended once it has."""
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        return f"exited with code {code}"

    def stop(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s: killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait(timeout_s)


class _RankActor:
    def follow(self, address: tuple[str, int], rank: int, token: str) -> None:
        follow(address, rank, token)


class _ActorFollower:
    """A follower rank in a Ray actor, in bundle `rank` of the caller's placement group (a Serve
    replica's `placement_group_bundles`; bundle 0 holds the replica itself, rank 0)."""

    def __init__(self, rank: int, address: tuple[str, int], token: str, config, placement_group):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = f"tensor-parallel rank {rank} (actor)"
        gpus = 1 if config.device != "cpu" and torch.cuda.is_available() else 0
        strategy = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=rank
        )
        actor_cls = ray.remote(num_cpus=0, num_gpus=gpus)(_RankActor)
        self.actor = actor_cls.options(scheduling_strategy=strategy).remote()
        self.done = self.actor.follow.remote(address, rank, token)

    def exit_status(self) -> str | None:
        import ray

        ready, _ = ray.wait([self.done], timeout=0)
        if not ready:
            return None
        try:
            ray.get(self.done, timeout=5)
        except Exception as e:  # the actor died, or `follow` raised there
            return f"died ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]})"
        return "returned"

    def stop(self, timeout_s: float) -> None:
        import ray

        ray.wait([self.done], timeout=timeout_s)
        ray.kill(self.actor)  # also when it returned: the actor holds its GPU until it exits


def _placement_group():
    """The placement group this process runs in under Ray, else None."""
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    return get_current_placement_group() if ray.is_initialized() else None


# -- rank 0 -----------------------------------------------------------------------------------------


class TensorParallelGroup:
    """Rank 0's side: starts the followers, sends them commands, watches them. Followers are Ray
    actors in this process's placement group when it has one (a Serve replica), else processes.

    Call `wait_ready()` once rank 0's own runner is built, before the first collective."""

    def __init__(self, config: EngineConfig):
        self.size = config.tensor_parallel_size
        self.followers: list = []
        self.channels: dict[int, Channel] = {}
        self._fatal: dict[int, str] = {}  # rank -> the exception a follower reported
        self._failed_rank: int | None = None
        self._closed = False
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None
        self.tp: TensorParallel | None = None
        group = _placement_group()
        if group is not None and len(group.bundle_specs) < self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} needs {self.size} placement-group bundles; "
                f"this replica has {len(group.bundle_specs)}"
            )
        host = "127.0.0.1" if group is None else socket.gethostbyname(socket.gethostname())
        self._server = socket.create_server((host, 0))
        address = (host, self._server.getsockname()[1])
        token = secrets.token_hex(16)
        try:
            self._store = dist.TCPStore(
                host, 0, self.size, True, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
                wait_for_workers=False,
            )  # fmt: skip
            for rank in range(1, self.size):
                self.followers.append(
                    _ProcessFollower(rank, address, token)
                    if group is None
                    else _ActorFollower(rank, address, token, config, group)
                )
            self._accept_all(token)
            for channel in self.channels.values():
                channel.send(("init", config, (host, self._store.port)))
            self.tp = join_collectives(config, 0, self._store)
        except BaseException:
            self.close()
            raise
        self._watch = threading.Thread(
            target=self._watch_followers, daemon=True, name="pdray-tp-watch"
        )
        self._watch.start()

    # -- setup ---------------------------------------------------------------------------------------

    def _accept_all(self, token: str) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while len(self.channels) < self.size - 1:
            self._raise_if_exited("before joining")
            if time.monotonic() > deadline:
                missing = [r for r in range(1, self.size) if r not in self.channels]
                raise TensorParallelError(
                    f"tensor-parallel rank(s) {missing} did not connect within "
                    f"{JOIN_TIMEOUT_S:.0f} s"
                )
            sock = accept(self._server, 0.1)
            if sock is None:
                continue
            channel = Channel(sock, "a tensor-parallel follower")
            try:
                kind, rank, their_token = channel.recv(10)
            except (OSError, ValueError, TypeError):
                channel.close()
                continue
            if kind != "hello" or their_token != token or not 0 < rank < self.size:
                channel.close()  # not one of ours
                continue
            channel.peer = f"tensor-parallel rank {rank}"
            self.channels[rank] = channel

    def wait_ready(self) -> None:
        """Wait (READY_TIMEOUT_S at most) until every follower has built its shard."""
        for rank in self.channels:
            reply = self._receive(rank, READY_TIMEOUT_S, "building its shard of the model")
            if reply != ("ready",):
                raise TensorParallelError(f"tensor-parallel rank {rank} sent {reply!r}")

    # -- commands ------------------------------------------------------------------------------------

    def broadcast(self, name: str, *args, target: str = "runner", reply: bool = False) -> None:
        """Have every follower run `<target>.<name>(*args)` (target "runner": its ModelRunner).
        With reply, `gather` must follow before the next command."""
        self.check()
        message = (target, name, args, reply)
        for rank, channel in self.channels.items():
            try:
                channel.send(message)
            except PeerGone as e:
                raise self._lost(rank) from e
            except TimeoutError as e:
                raise self._lost(rank, f"took no command for {SEND_TIMEOUT_S:.0f} s") from e

    def gather(self) -> list:
        """The followers' return values of the last command broadcast with reply, rank order."""
        results = []
        for rank in self.channels:
            kind, result = self._receive(rank, REPLY_TIMEOUT_S, "answering a command")
            results.append(result)
        for result in results:
            if isinstance(result, RankError):
                raise result
        return results

    def call(self, name: str, *args, target: str = "runner") -> list:
        """broadcast and gather: the followers' return values, in rank order (1, 2, ...)."""
        self.broadcast(name, *args, target=target, reply=True)
        return self.gather()

    def create(self, target: str, cls: type, *args) -> None:
        """On every follower, `target = cls(runner, *args)`; returns once they all have it."""
        self.call(_CREATE, cls, *args, target=target)

    def run_together(self, fn, runner, *args):
        """`fn(runner, *args)` on every rank at once (for collectives outside a forward, e.g. a
        benchmark's): rank 0's result; the followers' are discarded once they have finished."""
        self.broadcast(_CREATE, fn, *args, target="run_together", reply=True)
        try:
            return fn(runner, *args)
        finally:
            self.gather()

    def _receive(self, rank: int, timeout_s: float, doing: str):
        channel = self.channels[rank]
        deadline = time.monotonic() + timeout_s
        while not channel.readable(0.1):
            if self.followers[rank - 1].exit_status() is not None:
                raise self._lost(rank)
            if time.monotonic() > deadline:
                raise self._lost(rank, f"did not answer within {timeout_s:.0f} s ({doing})")
        try:
            message = channel.recv(30)
        except PeerGone as e:
            raise self._lost(rank) from e
        if message[0] == "fatal":
            self._fatal[rank] = message[1]
            raise self._lost(rank)
        return message

    # -- failures ------------------------------------------------------------------------------------

    def dead(self) -> list[str]:
        """Followers that have exited (the engine cannot run a step without them)."""
        return [f.name for f in self.followers if f.exit_status() is not None]

    def check(self) -> None:
        """Raise if a follower has been lost (by the watchdog or a failed call)."""
        if self._failed_rank is not None:
            raise self._lost(self._failed_rank)

    def explain(self, error: BaseException, wait_s: float = 2.0) -> None:
        """After a collective raised: raise an error naming the lost follower if one went away
        (waiting up to wait_s for its exit to show), else return."""
        deadline = time.monotonic() + wait_s
        while self._failed_rank is None and time.monotonic() < deadline:
            for rank, follower in enumerate(self.followers, start=1):
                if follower.exit_status() is not None:
                    self._mark_lost(rank)
                    break
            else:
                time.sleep(0.05)
        if self._failed_rank is not None:
            raise self._lost(self._failed_rank) from error

    def _raise_if_exited(self, when: str) -> None:
        for rank, follower in enumerate(self.followers, start=1):
            if follower.exit_status() is not None:
                raise self._lost(rank, when=when)

    def _mark_lost(self, rank: int) -> None:
        if self._failed_rank is None:
            self._failed_rank = rank
            if self.tp is not None:
                self.tp.collectives.abort()  # NCCL kernels waiting on the lost rank return

    def _lost(self, rank: int, detail: str | None = None, when: str = "") -> TensorParallelError:
        """The error for follower `rank`: its exception if it reported one, else how it ended."""
        self._mark_lost(rank)
        follower = self.followers[rank - 1]
        channel = self.channels.get(rank)
        if rank not in self._fatal and channel is not None:
            with contextlib.suppress(Exception):
                if channel.readable(0):
                    message = channel.recv(1)
                    if message[0] == "fatal":
                        self._fatal[rank] = message[1]
        parts = [follower.name]
        # its connection breaks a moment before its exit shows: give the exit time to show
        status = wait_until(follower.exit_status, 0 if detail else 2.0)
        if detail:
            parts.append(detail)
        elif status is not None:
            parts.append(status)
        else:
            parts.append("stopped answering")
        if when:
            parts.append(when)
        if rank in self._fatal:
            parts.append(f"after raising {self._fatal[rank]}")
        return TensorParallelError(" ".join(parts) + ": this engine cannot run")

    def _watch_followers(self) -> None:
        while not self._stop_watch.wait(WATCH_INTERVAL_S):
            for rank, follower in enumerate(self.followers, start=1):
                if follower.exit_status() is not None:
                    logger.error("%s %s", follower.name, follower.exit_status())
                    self._mark_lost(rank)
                    return

    # -- teardown ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the followers (STOP_TIMEOUT_S each, then killed) and free the communicator.
        Never waits on NCCL; safe to call twice, from a finalizer, at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        self._stop_watch.set()
        for channel in self.channels.values():
            with contextlib.suppress(OSError, TimeoutError):
                channel.send(None, timeout_s=2)
        for follower in self.followers:
            follower.stop(STOP_TIMEOUT_S)
        if self.tp is not None:
            self.tp.collectives.abort()
        for channel in self.channels.values():
            channel.close()
        self._server.close()
        self._store = None
