"""Tensor-parallel state: the rank, size and collectives the layers of one engine use.

The state is per engine, not per process: a ModelRunner binds its own `TensorParallel` (with
`bound(tp)`) around everything that builds or runs its model, and the layers read it through
`tp_rank()`, `tp_size()`, `all_reduce` and `all_gather_last_dim`. Two tensor-parallel engines in
one process (a notebook that makes a second LLM) therefore never share a group. World size 1
needs no collectives.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch


class Collectives:
    """The model's collectives over one process group backend (gloo or NCCL) built for a single
    engine (pdray/worker/tp_group.py), not torch.distributed's process-wide default group."""

    def __init__(self, backend, kind: str, fast=None):
        self.backend = backend
        self.kind = kind  # "gloo" or "nccl"
        self.fast = fast  # kernels/all_reduce.PeerAllReduce for small messages, or None

    def all_reduce(self, x: torch.Tensor) -> None:
        if self.fast is not None and self.fast.fits(x):
            self.fast(x)
        else:
            self.backend.allreduce([x]).wait()

    def all_gather(self, parts: list[torch.Tensor], x: torch.Tensor) -> None:
        self.backend.allgather([parts], [x]).wait()

    def abort(self) -> None:
        """Make kernels stuck on a lost peer return, and free NCCL's communicator without
        waiting for the peers (NCCL's orderly destroy waits for them: the old hang at close).
        gloo needs nothing: a peer that goes away closes its sockets and the call raises."""
        if self.fast is not None:
            self.fast.abort()  # its kernels spinning on a lost peer return
        if self.kind == "nccl":
            with contextlib.suppress(Exception):
                self.backend.abort()


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    collectives: Collectives | None = None

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} outside a group of {self.size}")


SINGLE = TensorParallel()
_local = threading.local()


def current() -> TensorParallel:
    return getattr(_local, "tp", SINGLE)


@contextlib.contextmanager
def bound(tp: TensorParallel):
    """Run the block (in this thread) with `tp` as the layers' tensor-parallel state."""
    previous = current()
    _local.tp = tp
    try:
        yield
    finally:
        _local.tp = previous


def tp_rank() -> int:
    return current().rank


def tp_size() -> int:
    return current().size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    tp = current()
    if tp.size > 1:
        tp.collectives.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    tp = current()
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    tp.collectives.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})"
        )
    return numerator // denominator
