"""Paged decode attention (one query token per sequence), split-KV ("flash-decoding") and GQA-aware.

One program owns (sequence, KV head, split): it loads the G = Hq / Hkv query heads that share the
KV head as one [G, D] tile (padded to 16 rows for the tensor cores), so each K/V byte is read once
for the whole group, and walks its share of the context through the block table with an online
softmax. With several splits, each writes a normalised partial output and its log-sum-exp, and a
second kernel merges them; with one split the first kernel writes the output itself.

The number of splits is a host-side choice from the batch shape only (never from device values),
so the launch is the same on every replay of a CUDA graph; a split past a sequence's end exits.
Reference: `kernels.reference.paged_attention_ref` with query_lens all 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SPLITS = 64
_MIN_TOKENS_PER_SPLIT = 128


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [S, Hq, D]
    k_cache_ptr,  # [N, B, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    out_ptr,  # [S, Hq, D] (one split) or partial outputs [S, Hq, SPLITS, D]
    lse_ptr,  # [S, Hq, SPLITS] float32 (several splits)
    scale,
    sliding_window,  # 0 = none
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_kn,
    stride_kb,
    stride_kh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    lo = start
    if sliding_window > 0:
        lo = tl.maximum(start, ((seq_len - sliding_window) // BLOCK_N) * BLOCK_N)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # [BLOCK_G]
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(lo, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        if sliding_window > 0:
            valid = valid & (offs >= seq_len - sliding_window)
        block = tl.load(table + offs // BLOCK_SIZE, mask=offs < end, other=0).to(tl.int64)
        row = block * stride_kn + (offs % BLOCK_SIZE) * stride_kb + kv_head * stride_kh  # [BLOCK_N]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") if IEEE else tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row_id = (seq * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(out_ptr + row_id[:, None] * HEAD_DIM + d[None, :], out, mask=mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
        tl.store(lse_ptr + row_id, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    partial_ptr,  # [S, Hq, SPLITS, D] float32
    lse_ptr,  # [S, Hq, SPLITS] float32
    out_ptr,  # [S, Hq, D]
    stride_os,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq * num_heads + head) * NUM_SPLITS
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + base + sp)  # [SPLITS]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # empty splits weigh 0
    total = tl.sum(w, 0)
    part = tl.load(
        partial_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :],
        mask=d[None, :] < HEAD_DIM,
        other=0.0,
    )  # [SPLITS, BLOCK_D]
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    dst = out_ptr + seq * stride_os + head * stride_oh + d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough (sequence, KV head, split) programs for about two waves over the SMs."""
    programs = num_seqs * num_kv_heads
    splits = 1
    while (
        splits < MAX_SPLITS
        and programs * splits < 2 * num_sms
        and max_seq_len >= 2 * splits * _MIN_TOKENS_PER_SPLIT
    ):
        splits *= 2
    return splits


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """query [S, Hq, D] (one token each) over kv_cache [2, N, B, Hkv, D] -> [S, Hq, D]."""
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if query.stride(2) != 1 or out.stride(2) != 1 or not kv_cache.is_contiguous():
        raise ValueError("paged_decode_attention needs a contiguous cache and last dims")
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = triton.next_power_of_2(head_dim)
    if num_splits == 1:
        partial, lse = out, out  # lse unused
    else:
        partial = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device
        )
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        partial,
        lse,
        scale,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            partial,
            lse,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
