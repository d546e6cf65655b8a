"""Skinny GEMM for decode: out [M, N] = x [M, K] @ weight[N, K].T (+ bias), M small (1..16).

At decode a linear layer is bound by reading its weight once, so one kernel streams the weight with
enough programs over N to fill the GPU (no split-K, no reduce kernel), each owning BLOCK_N whole
rows and walking K in BLOCK_K steps with fp32 accumulators:
- `use_dot=False` (M = 1 by default): multiply-adds in registers, [BLOCK_M, BLOCK_N, BLOCK_K]
  partial sums reduced over K once at the end;
- `use_dot=True`: the tensor cores on weight tile [BLOCK_N, BLOCK_K] x x-tile [BLOCK_K, 16].
Layouts: x [M, K] and weight [N, K] with unit stride along K, bias [N], out [M, N] in x's dtype.
The launch depends only on shapes (no host sync, no allocation but the output), so it can be
captured in a CUDA graph. `supports` says where this is the fast path; `linear` is correct for any
M and K (it re-reads the weight once per 16 rows when M > 16).
Reference: `torch.nn.functional.linear` with float32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_M = 16  # largest M for which `supports` picks this kernel over cuBLAS
_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    use_dot: bool
    num_warps: int
    num_stages: int


# Picked on one H200 by `python -m pdray.bench.linear --tune` (docs/performance.md, "Linear kernels
# (issue 17)"): multiply-adds at M = 1, tensor cores (M padded to 16) from M = 2.
_CONFIGS: dict[int, GemvConfig] = {
    1: GemvConfig(1, 4, 1024, False, num_warps=4, num_stages=3),
    16: GemvConfig(16, 32, 256, True, num_warps=4, num_stages=5),
}


def default_config(m: int) -> GemvConfig:
    """The tuned config for the smallest tabled M >= m (the largest one past the table)."""
    for limit in sorted(_CONFIGS):
        if m <= limit:
            return _CONFIGS[limit]
    return _CONFIGS[max(_CONFIGS)]


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)  # M tiles of one N tile run together: its weight tile is read once
    rm = (pid % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid // num_m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M or N re-read the last real row (no mask on the streaming loads); never stored
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = (k + rk)[None, :]
        if EVEN_K:
            w = tl.load(w_rows + cols)
            x = tl.load(x_rows + cols)
        else:
            w = tl.load(w_rows + cols, mask=cols < K, other=0.0)
            x = tl.load(x_rows + cols, mask=cols < K, other=0.0)
        if USE_DOT:
            acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_M]
        else:
            acc3 += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
    out = tl.trans(acc) if USE_DOT else tl.sum(acc3, 2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + tl.minimum(rn, N - 1)).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` is the fast path: CUDA bf16/fp16, x [M <= MAX_M, K], weight [N, K]
    row-major in x's dtype, K a multiple of 8 (16-byte aligned rows)."""
    return (
        x.is_cuda
        and weight.device == x.device
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.shape[-1] == weight.shape[1]
        and x.numel() // max(1, x.shape[-1]) <= MAX_M
        and weight.shape[1] % 8 == 0
        and weight.stride(0) % 8 == 0
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias [N]) -> [..., N] in x's dtype, written into `out` if
    given ([M, N] contiguous). `config` overrides the tuned block sizes (for tuning)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight [{n}, {k}] expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if k == 0:
        out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
        return out.reshape(*lead, n)
    cfg = config or default_config(m)
    block_m = max(cfg.block_m, 16) if cfg.use_dot else cfg.block_m
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, cfg.block_n),)
    _gemv_kernel[grid](
        x2, weight, bias if bias is not None else weight, out, m, n, k,
        x2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, USE_DOT=cfg.use_dot, EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.reshape(*lead, n)
