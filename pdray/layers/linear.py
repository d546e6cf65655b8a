"""Linear layers that shard over the tensor-parallel group, each with its own weight loader.

Column-parallel layers split the output features, row-parallel ones the input features (and
all-reduce their outputs). A checkpoint tensor is handed to `param.weight_loader(param, tensor,
shard_id)`, which copies this rank's slice into place, so the model loader stays generic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdray.worker.parallel import all_reduce, divide, tp_rank, tp_size


def _copy_into(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if target.shape != source.shape:
        raise ValueError(
            f"{what}: checkpoint shape {tuple(source.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(source)


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_into(param.data, loaded, type(self).__name__)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        """(shard_id, shape) of each checkpoint tensor of the weight, unsharded (dummy weights
        are drawn in these shapes so they do not depend on the tensor-parallel size)."""
        return [(None, tuple(self.weight.shape))]


class ReplicatedLinear(_Linear):
    pass


class ColumnParallelLinear(_Linear):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, tp_size(), "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        _copy_into(param.data, loaded.narrow(0, tp_rank() * size, size), type(self).__name__)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        out, features = self.weight.shape
        return [(None, (out * tp_size(), features))]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        source = loaded.narrow(0, tp_rank() * size, size)
        _copy_into(param.data.narrow(0, offset, size), source, f"merged part {shard_id}")

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        features = self.weight.shape[1]
        return [(i, (size, features)) for i, size in enumerate(self.output_sizes)]


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul; KV heads are replicated when fewer than ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ):
        size = tp_size()
        self.head_dim = head_dim
        self.total_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, size, "attention heads")
        if num_kv_heads >= size:
            self.num_kv_heads = divide(num_kv_heads, size, "KV heads")
        else:
            divide(size, num_kv_heads, "tensor_parallel_size over KV heads")
            self.num_kv_heads = 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * size
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, index = 0, self.q_size, tp_rank()
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size = self.kv_size
            num_kv_heads_total = loaded.shape[0] // self.head_dim
            replicas = max(1, tp_size() // num_kv_heads_total)
            index = tp_rank() // replicas
        source = loaded.narrow(0, index * size, size)
        _copy_into(param.data.narrow(0, offset, size), source, f"{shard_id}_proj")

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        features, kv_rows = self.weight.shape[1], self.total_kv_heads * self.head_dim
        q_rows = self.num_heads * tp_size() * self.head_dim
        return [("q", (q_rows, features)), ("k", (kv_rows, features)), ("v", (kv_rows, features))]


class RowParallelLinear(_Linear):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, tp_size(), "input features"), output_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if tp_rank() == 0 else None
        return all_reduce(F.linear(x, self.weight, bias))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 2:
            size = param.shape[1]
            loaded = loaded.narrow(1, tp_rank() * size, size)
        _copy_into(param.data, loaded, type(self).__name__)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        out, features = self.weight.shape
        return [(None, (out, features * tp_size()))]
