"""Fused small ops of the decoder, each one launch instead of the 5-20 that eager torch makes.

At decode these ops touch a few KB each, so their cost is launches, not bytes: about 35 kernels a
layer in eager torch against about 10 with these (measured gain in docs/performance.md). Each
rounds where the plain-torch version (`pdray.layers`) rounds, so float32 results are identical and
bf16/fp16 ones agree to the last bit in almost every element.
- `rms_norm(x, weight, eps, residual)`: optional residual add, then RMSNorm.
- `silu_and_mul(x)`: [T, 2d] (gate | up) -> silu(gate) * up.
- `rotary(positions, q, k, cos, sin, interleaved)`: rotary embedding of q and k in one launch.
- `rotary_write_kv(...)`: the same, with k (rotated) and v written straight into the KV cache
  (the attention layer's write, one launch for what took three).
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
def _rotate_heads(src, stride_h, dst, num_heads, h, f, cos, sin,
                  HALF: tl.constexpr, INTERLEAVED: tl.constexpr):  # fmt: skip
    """Rotate heads h [BLOCK_H, 1] of one token at `src` (stride_h between heads, unit stride
    within) into `dst` (heads 2 HALF apart); f [1, BLOCK_F] indexes the rotated pairs."""
    mask = (h < num_heads) & (f < HALF)
    if INTERLEAVED:
        i1, i2 = 2 * f, 2 * f + 1
    else:
        i1, i2 = f, f + HALF
    x1 = tl.load(src + h * stride_h + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * stride_h + i2, mask=mask, other=0.0).to(tl.float32)
    out = dst + h * (2 * HALF)
    ty = dst.dtype.element_ty
    tl.store(out + i1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(out + i2, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, slot_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, value_offset,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr, WRITE_KV: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """One token: q rotated into q_out [T, Hq, D]; k rotated into k_out [T, Hkv, D], or with
    WRITE_KV into the cache slot of the token (k_out = the cache, v copied `value_offset`
    further; slot < 0, a padded row, writes no KV)."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    f = tl.arange(0, BLOCK_F)[None, :]
    cos = tl.load(cos_ptr + pos * HALF + f, mask=f < HALF, other=0.0)  # [1, BLOCK_F]
    sin = tl.load(sin_ptr + pos * HALF + f, mask=f < HALF, other=0.0)
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    q_dst = q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, q_dst, NUM_Q_HEADS, hq, f, cos, sin,
                  HALF, INTERLEAVED)  # fmt: skip
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    k_src = k_ptr + token * stride_kt
    if WRITE_KV:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            k_dst = k_out_ptr + slot * (NUM_KV_HEADS * 2 * HALF)
            _rotate_heads(k_src, stride_kh, k_dst, NUM_KV_HEADS, hk, f, cos, sin, HALF,
                          INTERLEAVED)  # fmt: skip
            d = tl.arange(0, 2 * BLOCK_F)[None, :]
            v_mask = (hk < NUM_KV_HEADS) & (d < 2 * HALF)
            v = tl.load(v_ptr + token * stride_vt + hk * stride_vh + d, mask=v_mask)
            tl.store(k_dst + value_offset + hk * (2 * HALF) + d, v, mask=v_mask)
    else:
        k_dst = k_out_ptr + token * (NUM_KV_HEADS * 2 * HALF)
        _rotate_heads(k_src, stride_kh, k_dst, NUM_KV_HEADS, hk, f, cos, sin, HALF, INTERLEAVED)


def _launch_rotary(positions, q, k, v, q_out, k_out, slots, cos, sin, interleaved,
                   value_offset: int) -> None:  # fmt: skip
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    v_arg = k if v is None else v  # never read without slots
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, q, k, v_arg, q_out, k_out,
            slots if slots is not None else positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v_arg.stride(0), v_arg.stride(1),
            value_offset, NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HALF=head_dim // 2, INTERLEAVED=interleaved, WRITE_KV=slots is not None,
            BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
            BLOCK_F=triton.next_power_of_2(head_dim // 2),
        )  # fmt: skip


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous), cos/sin [P, D/2] float32 -> new q, k
    (one launch)."""
    q_out, k_out = (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )
    _launch_rotary(positions, q, k, None, q_out, k_out, None, cos, sin, interleaved, 0)
    return q_out, k_out


def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`rotary` and `kernels.kv_write.write_kv` in one launch: k rotated and v stored straight
    into kv_cache [2, N, B, Hkv, D] (contiguous) at slot_mapping (slots < 0 skipped); the
    rotated q [T, Hq, D]."""
    if not kv_cache.is_contiguous() or v.stride(2) != 1:
        raise ValueError(
            "rotary_write_kv needs a contiguous cache and V with a contiguous last dim"
        )
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _launch_rotary(positions, q, k, v, q_out, kv_cache, slot_mapping, cos, sin, interleaved,
                   kv_cache[0].numel())  # fmt: skip
    return q_out
