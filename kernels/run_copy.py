"""KV run copy: a [layers, 2, n blocks, ...] run of one KV cache into another, in one launch.

A run of n blocks across a range of layers is, in memory, `rows` = layers x 2 equally spaced rows of
n x block bytes (one per layer and K/V), on both sides; each program copies one tile of one row
with 16-byte accesses. torch's `copy_` of the same strided views runs at ~0.4 of a plain copy on an
H200 (docs/performance.md); this runs near it. Reference: `torch.Tensor.copy_`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 1024  # int64 words (8 KiB) per program; 1024-8192 x 4-16 warps measured within 4%


@triton.jit
def _copy_rows_kernel(dst_ptr, src_ptr, row_words, dst_row_stride, src_row_stride,
                      TILE: tl.constexpr):  # fmt: skip
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
    mask = offs < row_words
    words = tl.load(src_ptr + row * src_row_stride + offs, mask=mask)
    tl.store(dst_ptr + row * dst_row_stride + offs, words, mask=mask)


def _row_stride_words(t: torch.Tensor) -> int | None:
    """Row stride in int64 words when t [L, 2, n, block_size, Hkv, D] is 2L equally spaced rows of
    contiguous n-block runs, 16-byte aligned; None otherwise."""
    layers, _, *inner = t.shape
    expected = 1
    for size, stride in zip(reversed(inner), reversed(t.stride()[2:]), strict=True):
        if size > 1 and stride != expected:
            return None
        expected *= size
    if layers > 1 and t.stride(0) != 2 * t.stride(1):
        return None
    row_stride_bytes = t.stride(1) * t.element_size()
    if t.data_ptr() % 16 or row_stride_bytes % 8 or t[0, 0].nbytes % 8:
        return None
    return row_stride_bytes // 8


def _words(t: torch.Tensor) -> torch.Tensor:
    """An int64 tensor starting at t's first element (the kernel only takes its pointer)."""
    offset = t.storage_offset() * t.element_size() // 8
    return torch.empty(0, dtype=torch.int64, device=t.device).set_(
        t.untyped_storage(), offset, (1,)
    )


def copy_run(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for two [L, 2, n, block_size, Hkv, D] views of one dtype on CUDA devices,
    on the current stream."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"cannot copy {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} "
                         f"{dst.dtype}")  # fmt: skip
    if dst.numel() == 0:
        return
    dst_stride, src_stride = _row_stride_words(dst), _row_stride_words(src)
    if dst_stride is None or src_stride is None:
        dst.copy_(src, non_blocking=True)
        return
    row_words = src[0, 0].nbytes // 8
    grid = (triton.cdiv(row_words, _TILE), 2 * src.shape[0])
    _copy_rows_kernel[grid](_words(dst), _words(src), row_words, dst_stride, src_stride,
                            TILE=_TILE, num_warps=16)  # fmt: skip
