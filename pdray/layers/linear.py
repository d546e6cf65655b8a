"""Linear layers that shard over the tensor-parallel group, each with its own weight loader.

Column-parallel layers split the output features, row-parallel ones the input features (and
all-reduce their outputs). A checkpoint tensor is handed to `param.weight_loader(param, tensor,
shard_id)`, which copies this rank's slice into place, so the model loader stays generic.

With an `Int4Spec` a layer holds int4 `qweight`, `scales` and `zeros` instead of `weight`
(pdray/quantization/linear.py). Their rows are output features and their columns are in
proportion to the input features, so the same loaders shard them; a row-parallel rank holds
whole groups (its group size is chosen from the input features it holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdray.quantization.int4 import Int4Weight, quantize
from pdray.quantization.linear import empty_int4_weight, int4_linear, set_int4_params
from pdray.quantization.spec import Int4Spec
from pdray.worker.parallel import all_reduce, divide, tp_rank, tp_size


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, except one row of bf16/fp16 on CUDA (batch-1 decode), which goes to the GEMV
    kernel: it read an 8B model's layer shapes at 0.87 of bandwidth against cuBLAS's 0.82 on an
    H200 (docs/performance.md, "Linear kernels"); at 4-16 rows it read at 0.71-0.81 only."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] == 1:
        from pdray.kernels import gemv  # Triton: imported only on CUDA

        if gemv.supports(x, weight):
            return gemv.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _copy_into(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if target.shape != source.shape:
        raise ValueError(
            f"{what}: checkpoint shape {tuple(source.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(source)


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W full precision (`weight`) or int4 (`qweight`, `scales`, `zeros` in
    groups of `group_size` inputs); `in_features` and `out_features` are this rank's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, int4: Int4Spec | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int4 = int4
        self.group_size = None
        self.register_parameter("weight", None)
        for name in ("qweight", "scales", "zeros"):
            self.register_parameter(name, None)
        if int4 is not None:
            self.group_size = int4.group_size_for(in_features, type(self).__name__)
        if int4 is None or int4.quantize_at_load:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            set_int4_params(self, empty_int4_weight(out_features, in_features, self.group_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.qweight is None:
            return dense_linear(x, self.weight, bias)
        return int4_linear(x, Int4Weight(self.qweight, self.scales, self.zeros), bias)

    def quantize_weight(self, int4: Int4Spec | None = None) -> bool:
        """Replace the loaded full-precision `weight` by its round-to-nearest int4 parameters,
        per `int4` (default: the layer's own spec, if RTN); False if there is nothing to do."""
        int4 = int4 or self.int4
        if int4 is None or not int4.quantize_at_load or self.weight is None:
            return False
        self.int4 = int4
        self.group_size = int4.group_size_for(self.in_features, type(self).__name__)
        q = quantize(self.weight.data, self.group_size, int4.symmetric)
        self.weight = None
        set_int4_params(self, q)
        return True

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_into(param.data, loaded, type(self).__name__)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        """(shard_id, shape) of each checkpoint tensor of the weight, unsharded (dummy weights
        are drawn in these shapes so they do not depend on the tensor-parallel size)."""
        return [(None, (self.out_features, self.in_features))]


def quantize_linear_layers(module: nn.Module, int4: Int4Spec | None = None) -> int:
    """After loading: quantize every linear layer of `module` built to be quantized at load
    (RTN), or with `int4` every full-precision one; the number quantized. On CUDA the freed
    full-precision weights go back to the device, so the KV-cache sizing that follows (the
    allocator's peak) sees the int4 weights only."""
    count = sum(
        layer.quantize_weight(int4) for layer in module.modules() if isinstance(layer, LinearBase)
    )
    if count and any(p.is_cuda for p in module.parameters()):
        torch.cuda.empty_cache()
    return count


class ReplicatedLinear(LinearBase):
    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, int4: Int4Spec | None = None
    ):
        super().__init__(input_size, output_size, bias, int4)


class ColumnParallelLinear(LinearBase):
    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, int4: Int4Spec | None = None
    ):
        out = divide(output_size, tp_size(), "output features")
        super().__init__(input_size, out, bias, int4)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        _copy_into(param.data, loaded.narrow(0, tp_rank() * size, size), type(self).__name__)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        return [(None, (self.out_features * tp_size(), self.in_features))]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (e.g. gate and up)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        int4: Int4Spec | None = None,
    ):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, int4)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        source = loaded.narrow(0, tp_rank() * size, size)
        _copy_into(param.data.narrow(0, offset, size), source, f"merged part {shard_id}")

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        return [(i, (size, self.in_features)) for i, size in enumerate(self.output_sizes)]


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul; KV heads are replicated when fewer than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        int4: Int4Spec | None = None,
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
        super().__init__(hidden_size, out, bias, int4)

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
        features, kv_rows = self.in_features, self.total_kv_heads * self.head_dim
        q_rows = self.num_heads * tp_size() * self.head_dim
        return [("q", (q_rows, features)), ("k", (kv_rows, features)), ("v", (kv_rows, features))]


class RowParallelLinear(LinearBase):
    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, int4: Int4Spec | None = None
    ):
        features = divide(input_size, tp_size(), "input features")
        super().__init__(features, output_size, bias, int4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if tp_rank() == 0 else None
        return all_reduce(self._matmul(x, bias))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 2:
            size = param.shape[1]
            loaded = loaded.narrow(1, tp_rank() * size, size)
        _copy_into(param.data, loaded, type(self).__name__)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        return [(None, (self.out_features, self.in_features * tp_size()))]
