"""Fused small ops of the decoder, each one launch instead of the 5-20 that eager torch makes.

At decode these ops touch a few KB each, so their cost is launches, not bytes: about 35 kernels a
layer in eager torch against about 10 with these (measured gain in docs/performance.md). Each
rounds where the plain-torch version (`pdray.layers`) rounds, so float32 results are identical and
bf16/fp16 ones agree to the last bit in almost every element.
- `rms_norm(x, weight, eps, residual)`: optional residual add, then RMSNorm.
- `silu_and_mul(x)`: [T, 2d] (gate | up) -> silu(gate) * up.
- `rotary(positions, q, k, cos, sin, interleaved)`: rotary embedding of q and k in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0)).to(x.dtype)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    normed = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> normed [T, H]; with residual: (norm(x + residual), x + residual)."""
    x = x.contiguous()
    num_rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual.contiguous() if residual is not None else x
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x, res, weight, out, res_out, n, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8,
        )  # fmt: skip
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * 2 * d + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * d + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2d] -> [T, d]."""
    x = x.contiguous()
    num_rows, d = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, d), dtype=x.dtype, device=x.device)
    block = min(2048, triton.next_power_of_2(d))
    if num_rows:
        _silu_and_mul_kernel[(num_rows, triton.cdiv(d, block))](x, out, d, BLOCK=block)
    return out


@triton.jit
def _rotary_kernel(
    pos_ptr, x_ptr, out_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, num_heads,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    f = tl.arange(0, BLOCK_F)[None, :]
    mask = (h < num_heads) & (f < HALF)
    cos = tl.load(cos_ptr + pos * HALF + f, mask=f < HALF, other=0.0)  # [1, BLOCK_F]
    sin = tl.load(sin_ptr + pos * HALF + f, mask=f < HALF, other=0.0)
    if INTERLEAVED:
        i1, i2 = 2 * f, 2 * f + 1
    else:
        i1, i2 = f, f + HALF
    src = x_ptr + token * stride_xt + h * stride_xh
    x1 = tl.load(src + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * (num_heads * 2 * HALF) + h * (2 * HALF)
    ty = out_ptr.dtype.element_ty
    tl.store(dst + i1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(dst + i2, (x2 * cos + x1 * sin).to(ty), mask=mask)


def _rotate(positions, x, cos, sin, interleaved: bool) -> torch.Tensor:
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, x, out, cos, sin, x.stride(0), x.stride(1), num_heads,
            HALF=head_dim // 2, INTERLEAVED=interleaved,
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_F=triton.next_power_of_2(head_dim // 2),
        )  # fmt: skip
    return out


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous), cos/sin [P, D/2] float32 -> new q, k."""
    return _rotate(positions, q, cos, sin, interleaved), _rotate(
        positions, k, cos, sin, interleaved
    )
