"""A LayerChunk's payload (`KVPayload`): built by a sender or a transport, applied by the receiver.

  sender     cache_payload(its cache, chunk)  -> the cache + the chunk's source block ids
  local      hands that to the receiver as it is
  cuda_ipc   receiver side: cache_payload(the IPC-mapped sender cache, chunk)
  ucx        sender side: pack_payload -> one staging buffer (one gather launch), one message;
             receiver side: packed_payload(the received buffer) -> block ids 0..n-1
  receiver   one gather/scatter of the payload into the chunk's destination blocks

Block ids live on the CPU until the receiver (or `pack_payload`) moves them to the GPU with the
copy, so a payload is cheap to build and never orders work across CUDA streams.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from pdray.kernels.kv_copy import copy_kv_blocks
from pdray.kv_transfer.base import KVLayout, KVPayload, LayerChunk, head_slice


def runs_array(runs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Block runs as an [n, 3] int64 array (numpy's conversion of a list of tuples costs ~0.4 us
    an element)."""
    flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64, count=3 * len(runs))
    return flat.reshape(-1, 3)


def block_pairs(runs: Sequence[tuple[int, int, int]], max_blocks: int) -> torch.Tensor:
    """[2, n] int64 CPU tensor: the source (row 0) and destination (row 1) block of each pair the
    runs cover, in run order. ValueError for a run of no blocks or more than `max_blocks` pairs.
    Built with numpy: torch's CPU ops cost milliseconds each on a busy GPU host's thread pool."""
    if not runs:
        return torch.empty((2, 0), dtype=torch.int64)
    table = runs_array(runs)
    counts = table[:, 2]
    if (counts < 1).any() or counts.sum() > max_blocks:
        raise ValueError(f"block runs {list(runs)[:8]}... are empty or cover more than "
                         f"{max_blocks} blocks")  # fmt: skip
    firsts = np.repeat(table[:, :2], counts, axis=0)  # [n, 2]
    offsets = np.arange(len(firsts)) - np.repeat(np.cumsum(counts) - counts, counts)
    return torch.from_numpy(np.ascontiguousarray((firsts + offsets[:, None]).T))


def check_blocks(blocks: torch.Tensor, num_blocks: int, what: str) -> None:
    """ValueError unless every block id (of a CPU tensor) is in [0, num_blocks)."""
    ids = blocks.numpy()
    if ids.size and not (ids.min() >= 0 and ids.max() < num_blocks):
        raise ValueError(f"{what} names blocks outside a cache of {num_blocks} blocks")


def cache_payload(
    kv_cache: torch.Tensor,
    chunk: LayerChunk,
    layout: KVLayout | None = None,
    src_blocks: torch.Tensor | None = None,
) -> KVPayload:
    """The chunk's source blocks in `kv_cache` (of `layout`): a sender's payload. `src_blocks`:
    row 0 of the chunk's `block_pairs`, when already known. ValueError if the cache lacks some of
    the chunk's layers, blocks or heads."""
    num_layers, _, num_blocks, _, num_heads = kv_cache.shape[:5]
    if not 0 <= chunk.layer <= chunk.layer + chunk.num_layers <= num_layers:
        raise ValueError(f"layers {chunk.layer}+{chunk.num_layers} are not in the KV cache")
    if src_blocks is None:
        src_blocks = block_pairs(chunk.runs, num_blocks)[0]
    check_blocks(src_blocks, num_blocks, "the chunk")
    heads = slice(None) if layout is None else head_slice(chunk, layout)
    start, stop, _ = heads.indices(num_heads)
    return KVPayload(kv_cache, src_blocks, chunk.layer, chunk.num_layers, (start, stop))


def packed_payload(buffer: torch.Tensor) -> KVPayload:
    """A packed buffer [num_layers, 2, n, block_size, heads, head_dim] as a payload."""
    blocks = torch.from_numpy(np.arange(buffer.shape[2], dtype=np.int64))
    return KVPayload(buffer, blocks, 0, buffer.shape[0], (0, buffer.shape[4]))


def pack_payload(payload: KVPayload) -> torch.Tensor:
    """The payload's K and V in one new buffer [num_layers, 2, n, block_size, heads, head_dim]
    (one gather; on CUDA, finished when this returns)."""
    kv = payload.kv
    num_heads = payload.heads[1] - payload.heads[0]
    shape = (payload.num_layers, 2, payload.num_blocks, kv.shape[3], num_heads, kv.shape[5])
    packed = torch.empty(shape, dtype=kv.dtype, device=kv.device)
    ids = torch.from_numpy(np.arange(payload.num_blocks, dtype=np.int64))
    copy_kv_blocks(packed, ids, kv, payload.blocks,
                   src_layer=payload.layer, num_layers=payload.num_layers,
                   src_head=payload.heads[0], num_heads=num_heads)  # fmt: skip
    if packed.is_cuda:  # a transport may read it outside any stream's order
        torch.cuda.current_stream(packed.device).synchronize()
    return packed
