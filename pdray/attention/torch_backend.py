"""Plain-torch paged attention: the reference every faster backend is tested against.

Runs on CPU and GPU. Per sequence it gathers the context's K/V from the block table and calls
scaled_dot_product_attention with a causal mask offset by the cached length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdray.attention.base import AttentionBackend, AttentionMetadata


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """[query_len, seq_len] bool, True where query i (at position seq_len - query_len + i) may look."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """K and V of one sequence, each [seq_len, Hkv, D]."""
    num_blocks = -(-seq_len // kv_cache.shape[2])
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        num_heads = query.shape[1]
        start = 0
        for i, (query_len, seq_len) in enumerate(
            zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)
        ):
            k, v = gather_context(kv_cache, meta.block_tables[i], seq_len)
            group = num_heads // k.shape[1]
            q = query[start : start + query_len].transpose(0, 1)  # [Hq, q, D]
            k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, s, D]
            v = v.transpose(0, 1).repeat_interleave(group, dim=0)
            mask = causal_mask(query_len, seq_len, sliding_window, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[start : start + query_len] = o.transpose(0, 1)
            start += query_len
        return out
