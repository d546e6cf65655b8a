"""The attention layer models use: writes new K/V to its cache slice, then calls the backend."""

from __future__ import annotations

import torch
from torch import nn

from pdray.attention.base import get_forward_context
from pdray.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache = torch.empty(0)  # bound by the model runner: [2, N, B, Hkv, D]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq * D]; with `rope`, q and k are rotated
        first (at `positions`; with the KV write in one kernel where the backend can)."""
        ctx = get_forward_context()
        if rope is None:
            ctx.backend.write_kv(k, v, self.kv_cache, ctx.meta)
        else:
            q = ctx.backend.rotate_and_write_kv(positions, q, k, v, rope, self.kv_cache, ctx.meta)
        if ctx.on_layer_kv_written is not None:
            ctx.on_layer_kv_written(self.layer_idx)
        out = ctx.backend.forward(q, self.kv_cache, ctx.meta, self.scale, self.sliding_window)
        return out.flatten(1)
