"""Tensor-parallel state of this process: rank and world size of its group, and collectives.

World size 1 needs no process group; the layers still shard by (rank, size) so a larger group only
has to initialise torch.distributed and call `set_tensor_parallel`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_tp_rank = 0
_tp_size = 1
_tp_group: dist.ProcessGroup | None = None


def set_tensor_parallel(rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
    global _tp_rank, _tp_size, _tp_group
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} outside a group of {size}")
    _tp_rank, _tp_size, _tp_group = rank, size, group


def tp_rank() -> int:
    return _tp_rank


def tp_size() -> int:
    return _tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size > 1:
        dist.all_reduce(x, group=_tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_tp_group)
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})"
        )
    return numerator // denominator
