"""Plain-torch references for the Triton kernels: slow, obvious, float32 inside.

Shapes: T = tokens in the step, S = sequences, Hq / Hkv = query / KV heads, D = head_dim,
N = cache blocks, B = block_size. The KV cache of one layer is [2, N, B, Hkv, D].
"""

from __future__ import annotations

import torch


def write_kv_ref(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value [T, Hkv, D] into kv_cache [2, N, B, Hkv, D]; slots < 0 are skipped (padding)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key[keep]
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value[keep]


def paged_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """query [T, Hq, D] -> [T, Hq, D]: each sequence's queries are its last tokens, causal."""
    out = torch.empty_like(query)
    block_size = kv_cache.shape[2]
    num_heads = query.shape[1]
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:seq_len].float()  # [s, Hkv, D]
        v = kv_cache[1, blocks].flatten(0, 1)[:seq_len].float()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [s, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        q = query[start : start + query_len].float()  # [q, Hq, D]
        scores = torch.einsum("qhd,shd->hqs", q, k) * scale
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start : start + query_len] = torch.einsum("hqs,shd->qhd", probs, v).to(query.dtype)
        start += query_len
    return out
