"""A tensor-parallel group: rank 0 is the engine's own ModelRunner; ranks 1..N-1 follow it.

  rank 0 (engine process)                     rank r (a follower: a Ray actor in the replica's
                                              placement group, or a child process offline)
  TensorParallelGroup(config)  -- spawns -->  follow(rank, ...): init_process_group, ModelRunner
  init_process_group, set_tensor_parallel      loop: command <- broadcast from rank 0
  ModelRunner builds its shard of the model      (runner, _bind_kv_cache, num_blocks) -> scratch/real KV
  per call: broadcast(command), then run it      (runner, _capture_graphs, max_len)   -> capture graphs
                                                 (runner, execute, batch)     -> forward, no sampling
                                                 (kv, ...)  -> this rank's KV sender or receiver
                                                 None                         -> exit

A command names a target object on the follower ("runner", or one made by `create`, e.g. the
rank's KV transfer endpoint) and a method; `call` also gathers the followers' return values.

Every rank runs the same forward in the same order, so the all-reduces of the row-parallel layers
and the LM head's all-gather meet; only rank 0 samples. Commands travel on a gloo group (a pickled
StepBatch, no GPU memory); the model's collectives use NCCL on GPU and gloo on CPU. The rendezvous
port is one the OS gave this engine, so two engines on a node never collide. A follower that dies
breaks the next collective: rank 0 raises, and the engine's owner (a Serve replica's health check)
replaces the engine.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from pdray.config import EngineConfig
from pdray.worker.parallel import set_tensor_parallel

logger = logging.getLogger(__name__)

_TIMEOUT = timedelta(minutes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def init_rank(config: EngineConfig, rank: int, address: str) -> dist.ProcessGroup:
    """Join the group at `address` (tcp://host:port) as `rank`; returns the command group.

    The model's collectives use `collective_backend(config)`; commands always travel on gloo."""
    _device_for(config, rank)
    backend = collective_backend(config)
    dist.init_process_group(
        backend=backend,
        init_method=address,
        world_size=config.tensor_parallel_size,
        rank=rank,
        timeout=_TIMEOUT,
    )
    set_tensor_parallel(rank, config.tensor_parallel_size, dist.group.WORLD)
    return (
        dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=_TIMEOUT)
    )


def follow(rank: int, config: EngineConfig, address: str) -> None:
    """Body of a follower rank: build this rank's shard and run rank 0's commands until None."""
    from pdray.worker.model_runner import ModelRunner

    commands = init_rank(config, rank, address)
    runner = ModelRunner(config)
    targets: dict = {"runner": runner}
    try:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=commands)
            if box[0] is None:
                return
            target, name, args, reply = box[0]
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
                dist.gather_object(result, None, dst=0, group=commands)
    finally:
        for target in targets.values():
            close = getattr(target, "close", None)
            if close is not None and target is not runner:
                close()
        dist.destroy_process_group()


_CREATE = "__create__"


class RankError(RuntimeError):
    """A follower's command with a reply failed; `gather` raises it on rank 0."""


class _ProcessFollower:
    """A follower rank in a child process (offline engines)."""

    def __init__(self, rank: int, config: EngineConfig, address: str):
        self.name = f"tensor-parallel rank {rank} (process)"
        ctx = mp.get_context("spawn")
        self.process = ctx.Process(target=follow, args=(rank, config, address), daemon=True)
        self.process.start()

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout_s: float) -> None:
        self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()


class _RankActor:
    def follow(self, rank: int, config: EngineConfig, address: str) -> None:
        follow(rank, config, address)


class _ActorFollower:
    """A follower rank in a Ray actor, in bundle `rank` of the caller's placement group (a Serve
    replica's `placement_group_bundles`; bundle 0 holds the replica itself, rank 0)."""

    def __init__(self, rank: int, config: EngineConfig, address: str, placement_group):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = f"tensor-parallel rank {rank} (actor)"
        gpus = 1 if config.device != "cpu" and torch.cuda.is_available() else 0
        strategy = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=rank
        )
        actor_cls = ray.remote(num_cpus=0, num_gpus=gpus)(_RankActor)
        self.actor = actor_cls.options(scheduling_strategy=strategy).remote()
        self.done = self.actor.follow.remote(rank, config, address)

    def alive(self) -> bool:
        import ray

        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def stop(self, timeout_s: float) -> None:
        import ray

        ready, _ = ray.wait([self.done], timeout=timeout_s)
        if not ready:
            ray.kill(self.actor)


def _placement_group():
    """The placement group this process runs in under Ray, else None."""
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    return get_current_placement_group() if ray.is_initialized() else None


class TensorParallelGroup:
    """Rank 0's side: starts the followers and broadcasts commands to them. Followers are Ray
    actors in this process's placement group when it has one (a Serve replica), else processes."""

    def __init__(self, config: EngineConfig):
        self.size = config.tensor_parallel_size
        group = _placement_group()
        if group is not None and len(group.bundle_specs) < self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} needs {self.size} placement-group bundles; "
                f"this replica has {len(group.bundle_specs)}"
            )
        host = "127.0.0.1" if group is None else socket.gethostbyname(socket.gethostname())
        address = f"tcp://{host}:{_free_port()}"
        self.followers = [
            _ProcessFollower(rank, config, address)
            if group is None
            else _ActorFollower(rank, config, address, group)
            for rank in range(1, self.size)
        ]
        self.commands = init_rank(config, 0, address)
        self._closed = False

    def broadcast(self, name: str, *args, target: str = "runner", reply: bool = False) -> None:
        """Have every follower run `<target>.<name>(*args)` (target "runner": its ModelRunner).
        With reply, `gather` must follow before the next command."""
        dead = self.dead()
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited: this engine cannot run")
        dist.broadcast_object_list([(target, name, args, reply)], src=0, group=self.commands)

    def dead(self) -> list[str]:
        """Followers that have exited (the engine cannot run a step without them)."""
        return [f.name for f in self.followers if not f.alive()]

    def gather(self) -> list:
        """The followers' return values of the last command broadcast with reply, rank order."""
        results = [None] * self.size
        dist.gather_object(None, results, dst=0, group=self.commands)
        for result in results[1:]:
            if isinstance(result, RankError):
                raise result
        return results[1:]

    def call(self, name: str, *args, target: str = "runner") -> list:
        """broadcast and gather: the followers' return values, in rank order (1, 2, ...)."""
        self.broadcast(name, *args, target=target, reply=True)
        return self.gather()

    def create(self, target: str, cls: type, *args) -> None:
        """On every follower, `target = cls(runner, *args)`; returns once they all have it."""
        self.call(_CREATE, cls, *args, target=target)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if all(f.alive() for f in self.followers):
            dist.broadcast_object_list([None], src=0, group=self.commands)
        for follower in self.followers:
            follower.stop(timeout_s=30)
        dist.destroy_process_group()
        set_tensor_parallel(0, 1, None)
