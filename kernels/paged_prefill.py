"""Paged prefill attention: a step's queries over each sequence's whole cached context.

Covers chunked prefill and prefix-cache hits: sequence s has q_len new tokens at the end of a
context of seq_len tokens whose K/V (the new ones included: they are written first) live in
the cache behind its block table. One program owns BLOCK_M queries of one sequence and one query
head, and walks the keys up to its causal limit with an online softmax (flash-attention style);
tiles past a sequence's queries exit at once. Sequences of any mix of lengths share one launch,
decode rows included. Reference: `kernels.reference.paged_attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [N, B, Hkv, D]
    v_cache_ptr,
    out_ptr,  # [T, Hq, D]
    query_start_loc_ptr,  # [S + 1] int32
    seq_lens_ptr,  # [S] int32
    block_tables_ptr,  # [S, max_blocks] int32
    qk_scale,  # softmax scale * log2(e)
    sliding_window,  # 0 = none
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_kn,
    stride_kb,
    stride_kh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    m_tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=m_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = context + offs_m  # [BLOCK_M]

    hi = tl.minimum(seq_len, context + (m_tile + 1) * BLOCK_M)
    lo = 0
    if sliding_window > 0:
        lo = tl.maximum(0, context + m_tile * BLOCK_M - sliding_window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        row = block * stride_kn + (offs_n % BLOCK_SIZE) * stride_kb + kv_head * stride_kh
        kv_mask = n_valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") if IEEE else tl.dot(q, tl.trans(k))
        allowed = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        if sliding_window > 0:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    dst = out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


def paged_prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """query [T, Hq, D] over kv_cache [2, N, B, Hkv, D] -> [T, Hq, D], causal per sequence."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    if query.stride(2) != 1 or out.stride(2) != 1 or not kv_cache.is_contiguous():
        raise ValueError("paged_prefill_attention needs a contiguous cache and last dims")
    ieee = query.dtype == torch.float32
    block_m = block_m or (32 if ieee else 64)
    block_n = block_n or (32 if ieee else 64)
    num_seqs = seq_lens.shape[0]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * _LOG2E,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        IEEE=ieee,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
