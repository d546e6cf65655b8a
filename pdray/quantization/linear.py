"""The int4 side of the linear layers (pdray/layers/linear.py): their parameters and matmul.

A linear layer built with an `Int4Spec` holds `qweight`, `scales` and `zeros` (pdray's wint4
layout, `int4.py`) as parameters with the layer's own weight loader, instead of `weight`:
- from an AWQ/GPTQ checkpoint they exist from construction and are loaded (converted by
  `checkpoint.py`, sharded by the layer like a weight);
- with RTN the layer first holds and loads a full-precision `weight` as usual and replaces it
  with int4 parameters once loaded (`quantize_linear_layers`).
"""

from __future__ import annotations

import torch
from torch import nn

from pdray.quantization.int4 import Int4Weight, int4_linear_reference

INT4_PARAMS = ("qweight", "scales", "zeros")  # the fields of Int4Weight
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def int4_linear(x: torch.Tensor, q: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ W.T (+ bias) for an int4 W [N, K]: the Triton kernel for bf16/fp16 on CUDA
    (kernels/int4_gemm.py, imported only there), the dequantize-then-matmul reference otherwise
    (CPU, or float32 on CUDA)."""
    if x.is_cuda and x.dtype in _KERNEL_DTYPES:
        from pdray.kernels.int4_gemm import int4_linear as kernel

        return kernel(x, q, bias)
    return int4_linear_reference(x, q, bias)


def empty_int4_weight(
    out_features: int, in_features: int, group_size: int, dtype: torch.dtype | None = None
) -> Int4Weight:
    """Uninitialised int4 tensors for a [out_features, in_features] weight (to be loaded)."""
    groups = in_features // group_size
    return Int4Weight(
        torch.empty(out_features, in_features // 2, dtype=torch.uint8),
        torch.empty(out_features, groups, dtype=dtype),
        torch.empty(out_features, groups, dtype=dtype),
    )


def set_int4_params(layer: nn.Module, q: Int4Weight) -> None:
    """Register q's tensors as the layer's `qweight`, `scales`, `zeros` parameters."""
    for name in INT4_PARAMS:
        param = nn.Parameter(getattr(q, name), requires_grad=False)
        param.weight_loader = layer.weight_loader
        setattr(layer, name, param)
