"""KV block gather/scatter: blocks `src_blocks[i]` of one KV cache into blocks `dst_blocks[i]` of
another, for a range of layers, K and V, and a range of KV heads, in one launch.

Caches are [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] (a packed staging
buffer is the same with num_blocks = n, read or written with block ids 0..n-1). One copy of one
block of one layer's K or V is `rows` (block_size tokens) of `row_words` words (the copied heads
of one token); when the heads are whole on both sides the block is one contiguous row. A program
copies one tile of one such block copy: grid (block pair, layer x K/V, tile). Words are the widest
of 8/4/2/1 bytes that every offset and stride allows (int64 for fp16/bf16/fp32 caches with an even
head_dim), so aligned copies move 16 bytes per access. The source may be another GPU's memory
(peer access, CUDA IPC): the kernel runs on the destination's GPU.

`copy_kv_blocks` runs the Triton kernel when both tensors are on CUDA and the plain-torch
reference (`copy_kv_blocks_ref`, index_select + index_copy_) otherwise; this module imports
without Triton (CPU hosts use the reference).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only host: the torch reference only
    triton = tl = None

    def _jit(fn):
        return fn


_TILE_WORDS = 1024  # words per program (8 KiB of int64): run_copy's measured sweet spot
_MAX_GRID_YZ = 65535
_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)  # widest first


@_jit
def _kv_copy_kernel(dst_ptr, src_ptr, dst_ids_ptr, src_ids_ptr, rows, row_words, col_tiles,
                    dst_layer_stride, dst_kv_stride, dst_block_stride, dst_row_stride,
                    src_layer_stride, src_kv_stride, src_block_stride, src_row_stride,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    layer, kv = layer_kv // 2, layer_kv % 2
    src_block = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + pair).to(tl.int64)
    src_base = layer * src_layer_stride + kv * src_kv_stride + src_block * src_block_stride
    dst_base = layer * dst_layer_stride + kv * dst_kv_stride + dst_block * dst_block_stride
    r = (tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < row_words)[None, :]
    r64 = r.to(tl.int64)[:, None]
    words = tl.load(src_ptr + src_base + r64 * src_row_stride + c[None, :], mask=mask)
    tl.store(dst_ptr + dst_base + r64 * dst_row_stride + c[None, :], words, mask=mask)


def _regions(dst, src, num_layers, dst_layer, src_layer, num_heads, dst_head, src_head):
    """Validated (dst view, src view), each [num_layers, 2, blocks, block_size, num_heads, D];
    num_layers / num_heads None: the source's from src_layer / src_head on."""
    num_layers = src.shape[0] - src_layer if num_layers is None else num_layers
    num_heads = src.shape[4] - src_head if num_heads is None else num_heads
    if dst.dim() != 6 or src.dim() != 6 or dst.shape[1] != 2 or src.shape[1] != 2:
        raise ValueError(f"KV caches are [layers, 2, blocks, block_size, heads, head_dim], got "
                         f"{tuple(dst.shape)} and {tuple(src.shape)}")  # fmt: skip
    if dst.dtype != src.dtype or dst.shape[3] != src.shape[3] or dst.shape[5] != src.shape[5]:
        raise ValueError(
            f"cannot copy blocks of {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} "
            f"{dst.dtype}: block_size, head_dim and dtype must match"
        )
    for name, t, layer, head in (("source", src, src_layer, src_head),
                                 ("destination", dst, dst_layer, dst_head)):  # fmt: skip
        if not 0 <= layer <= layer + num_layers <= t.shape[0]:
            raise ValueError(f"layers {layer}..{layer + num_layers - 1} are not in the {name}")
        if not 0 <= head <= head + num_heads <= t.shape[4]:
            raise ValueError(f"KV heads {head}..{head + num_heads - 1} are not in the {name}")
    d = dst[dst_layer : dst_layer + num_layers, :, :, :, dst_head : dst_head + num_heads]
    s = src[src_layer : src_layer + num_layers, :, :, :, src_head : src_head + num_heads]
    return d, s


def _check_ids(dst_blocks: torch.Tensor, src_blocks: torch.Tensor) -> int:
    """The number of block pairs."""
    n = dst_blocks.numel()
    for name, blocks in (("destination", dst_blocks), ("source", src_blocks)):
        if blocks.dim() != 1 or blocks.numel() != n:
            raise ValueError(f"block ids must be two 1-d tensors of one length, got "
                             f"{tuple(dst_blocks.shape)} and {tuple(src_blocks.shape)}")  # fmt: skip
        if blocks.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} block ids must be int32 or int64, got {blocks.dtype}")
    return n


def copy_kv_blocks_ref(
    dst: torch.Tensor,
    dst_blocks: torch.Tensor,
    src: torch.Tensor,
    src_blocks: torch.Tensor,
    *,
    num_layers: int | None = None,
    dst_layer: int = 0,
    src_layer: int = 0,
    num_heads: int | None = None,
    dst_head: int = 0,
    src_head: int = 0,
) -> None:
    """Plain-torch `copy_kv_blocks` (any devices; the source is gathered, moved, then scattered)."""
    _check_ids(dst_blocks, src_blocks)
    d, s = _regions(dst, src, num_layers, dst_layer, src_layer, num_heads, dst_head, src_head)
    picked = s.index_select(2, src_blocks.to(s.device, torch.int64))
    d.index_copy_(2, dst_blocks.to(d.device, torch.int64), picked.to(d.device))


def copy_kv_blocks(
    dst: torch.Tensor,
    dst_blocks: torch.Tensor,
    src: torch.Tensor,
    src_blocks: torch.Tensor,
    *,
    num_layers: int | None = None,
    dst_layer: int = 0,
    src_layer: int = 0,
    num_heads: int | None = None,
    dst_head: int = 0,
    src_head: int = 0,
) -> None:
    """dst[dst_layer + l, :, dst_blocks[i], :, dst_head + h] = src[src_layer + l, :, src_blocks[i],
    :, src_head + h] for l < num_layers (default: the source's layers from src_layer), every i and
    h < num_heads (default: the source's heads from src_head).

    Block ids are 1-d int32/int64 tensors, not range-checked here (the caller validates them);
    destination ids must be distinct. On CUDA: one launch on the current stream of dst's device,
    ids moved to that device if they are elsewhere.
    """
    if not (dst.is_cuda and src.is_cuda and triton is not None):
        copy_kv_blocks_ref(dst, dst_blocks, src, src_blocks, num_layers=num_layers,
                           dst_layer=dst_layer, src_layer=src_layer, num_heads=num_heads,
                           dst_head=dst_head, src_head=src_head)  # fmt: skip
        return
    with torch.cuda.device(dst.device):
        copy_kv_blocks_triton(dst, dst_blocks, src, src_blocks, num_layers=num_layers,
                              dst_layer=dst_layer, src_layer=src_layer, num_heads=num_heads,
                              dst_head=dst_head, src_head=src_head)  # fmt: skip


def copy_kv_blocks_triton(
    dst: torch.Tensor,
    dst_blocks: torch.Tensor,
    src: torch.Tensor,
    src_blocks: torch.Tensor,
    *,
    num_layers: int | None = None,
    dst_layer: int = 0,
    src_layer: int = 0,
    num_heads: int | None = None,
    dst_head: int = 0,
    src_head: int = 0,
) -> None:
    """`copy_kv_blocks` by the Triton kernel on the current device and stream (on CPU tensors
    under TRITON_INTERPRET=1: how the kernel tests run without a GPU)."""
    n = _check_ids(dst_blocks, src_blocks)
    d, s = _regions(dst, src, num_layers, dst_layer, src_layer, num_heads, dst_head, src_head)
    if d.numel() == 0:
        return
    plan = _plan(d, s)
    if plan is None:  # strides the kernel does not cover (heads not adjacent in a token row)
        copy_kv_blocks_ref(d, dst_blocks, s, src_blocks)
        return
    (dw, sw), rows, row_words = plan
    block_c = min(triton.next_power_of_2(row_words), _TILE_WORDS)
    block_r = min(triton.next_power_of_2(rows), max(1, _TILE_WORDS // block_c))
    col_tiles = triton.cdiv(row_words, block_c)
    grid = (n, 2 * d.shape[0], triton.cdiv(rows, block_r) * col_tiles)
    if grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        copy_kv_blocks_ref(d, dst_blocks, s, src_blocks)
        return
    dst_ids = dst_blocks.to(dst.device, non_blocking=True)
    src_ids = src_blocks.to(dst.device, non_blocking=True)
    _kv_copy_kernel[grid](
        dw, sw, dst_ids, src_ids, rows, row_words, col_tiles,
        dw.stride(0), dw.stride(1), dw.stride(2), dw.stride(3),
        sw.stride(0), sw.stride(1), sw.stride(2), sw.stride(3),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=max(1, min(16, block_r * block_c // 64)),
    )  # fmt: skip


def _plan(d: torch.Tensor, s: torch.Tensor):
    """((dst words, src words), rows, row_words) for views [L, 2, N, B, h, D], or None.

    Word views reinterpret the same memory as the widest integer type every stride, offset and
    row allows; a token's copied heads must be one contiguous row on both sides."""
    for word in _WORDS:
        try:
            dw, sw = d.view(word), s.view(word)
        except RuntimeError:  # an offset, a stride or the row is not a multiple of this word
            continue
        if not all(_token_rows_contiguous(t) for t in (dw, sw)):
            return None
        rows, row_words = dw.shape[3], dw.shape[4] * dw.shape[5]
        if rows == 1 or (dw.stride(3) == row_words and sw.stride(3) == row_words):
            return (dw, sw), 1, rows * row_words  # whole blocks: one contiguous row each
        return (dw, sw), rows, row_words
    return None


def _token_rows_contiguous(t: torch.Tensor) -> bool:
    heads, head_words = t.shape[4], t.shape[5]
    return (head_words == 1 or t.stride(5) == 1) and (heads == 1 or t.stride(4) == head_words)
