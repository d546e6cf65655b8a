"""pdray's weight-only int4 format (`wint4`) and its plain-torch reference.

A linear layer's weight W [N, K] (out features, in features) is stored as
- `qweight` uint8 [N, K // 2]: two 4-bit codes per byte along K; byte j of a row holds the code
  of column 2j in its low nibble and of column 2j + 1 in its high nibble;
- `scales`  [N, K // group_size] in the activation dtype;
- `zeros`   [N, K // group_size] in the activation dtype, integer-valued in [0, 15]
  (8 for symmetric quantization),
and W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g].

Rows stay rows, so column-parallel layers shard `qweight`, `scales` and `zeros` along dim 0 and
row-parallel layers along dim 1 (a shard must hold whole groups). AWQ and GPTQ checkpoints map
onto this layout at load. The Triton kernels (kernels/int4_gemm.py) read exactly this layout;
`dequantize` and `int4_linear_reference` are their reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 15


def choose_group_size(in_features: int) -> int:
    """128, else the largest of 64 and 32 that divides `in_features`."""
    for size in (128, 64, 32):
        if in_features % size == 0:
            return size
    raise ValueError(
        f"wint4 needs in_features divisible by 32 (or 64, 128); this layer has {in_features}"
    )


@dataclass(frozen=True, slots=True)
class Int4Weight:
    qweight: torch.Tensor  # uint8 [N, K // 2]
    scales: torch.Tensor  # [N, K // g]
    zeros: torch.Tensor  # [N, K // g], integer-valued

    @property
    def group_size(self) -> int:
        return 2 * self.qweight.shape[1] // self.scales.shape[1]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] integers in [0, 15] -> uint8 [N, K // 2] (even column in the low nibble)."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> codes uint8 [N, K]."""
    low, high = qweight & 0xF, qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def quantize(weight: torch.Tensor, group_size: int, symmetric: bool) -> Int4Weight:
    """Round-to-nearest int4 of weight [N, K] per group of `group_size` along K.

    Symmetric: zero 8, scale max|w| / 7 (codes 1..15 used). Asymmetric: zero and scale from the
    group's min and max, the zero rounded to an integer so (code - zero) * scale is exact at 0.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    w = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = w.abs().amax(-1).clamp_min(1e-8) / 7
        zero = torch.full_like(scale, 8.0)
    else:
        low = w.amin(-1).clamp_max(0)
        high = w.amax(-1).clamp_min(0)
        scale = ((high - low) / QMAX).clamp_min(1e-8)
        zero = (-low / scale).round().clamp(0, QMAX)
    codes = (w / scale[..., None] + zero[..., None]).round().clamp(0, QMAX)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Int4Weight(pack(codes.reshape(n, k)), scale.to(dtype), zero.to(dtype))


def dequantize(q: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] that `q` stands for, computed in float32 and cast to `dtype`."""
    codes = unpack(q.qweight).float()
    n, k = codes.shape
    g = q.group_size
    w = (codes.reshape(n, k // g, g) - q.zeros.float()[..., None]) * q.scales.float()[..., None]
    return w.reshape(n, k).to(dtype or q.scales.dtype)


def int4_linear_reference(
    x: torch.Tensor, q: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ dequantize(q).T (+ bias), in x's dtype: what the kernels must compute."""
    return torch.nn.functional.linear(x, dequantize(q, x.dtype), bias)
