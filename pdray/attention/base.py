"""Attention backend interface and the per-step context the attention layers read.

The model runner builds one `AttentionMetadata` per forward and sets it as the current context, so
layers keep plain `forward(positions, hidden)` signatures. A backend writes the step's new K/V into
the paged cache and computes attention of the step's queries over each sequence's cached context.

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V); the
layers of one engine are slices of one allocation [num_layers, 2, ...], so a block of one layer is
a contiguous run of bytes (what KV transfer copies).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pdray.layers.rotary import RotaryEmbedding


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token
    query_start_loc: torch.Tensor  # [S + 1] int32: token offsets of each sequence's queries
    seq_lens: torch.Tensor  # [S] int32: context length (cached + new) of each sequence
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int


class AttentionBackend:
    """One implementation of paged attention (torch reference, Triton, flash-attn)."""

    name = "base"

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Store key/value [T, Hkv, D] into kv_cache [2, N, B, Hkv, D] at meta.slot_mapping."""
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, key)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, value)

    def rotate_and_write_kv(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rope: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Rotary embedding of query and key (`rope`), then `write_kv`; the rotated query.
        Backends may do it in one kernel."""
        query, key = rope(positions, query, key)
        self.write_kv(key, value, kv_cache, meta)
        return query

    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """query [T, Hq, D] -> output [T, Hq, D], causal over each sequence's cached context."""
        raise NotImplementedError


@dataclass(slots=True)
class ForwardContext:
    meta: AttentionMetadata
    backend: AttentionBackend
    # Called with the layer index once that layer's new KV is in the cache (layer-wise transfer).
    on_layer_kv_written: Callable[[int], None] | None = None


# Per thread: two engines of one process (a local prefill/decode pair) run their forwards at
# the same time on their own loops' threads.
_local = threading.local()


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "context", None)
    if ctx is None:
        raise RuntimeError("attention layer called outside a model-runner forward")
    return ctx


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    previous, _local.context = getattr(_local, "context", None), ctx
    try:
        yield
    finally:
        _local.context = previous
