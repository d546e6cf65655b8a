"""KV block gather/scatter: the torch reference equals a naive per-block loop (CPU), and the Triton
kernel equals the reference (GPU, or Triton's interpreter with TRITON_INTERPRET=1), over block
tables contiguous, every other block, reversed and permuted, layer and KV-head sub-ranges (source
heads != destination heads, as when tensor-parallel sizes differ) and packed sources."""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_utils import HAS_CUDA, NEEDS_GPU
from pdray.kernels.kv_copy import copy_kv_blocks, copy_kv_blocks_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # copied as integer words: exact
TABLES = ["contiguous", "every_other", "reversed", "permutation", "random"]
# (src layers, dst layers, num_layers, src_layer, dst_layer): whole caches, then sub-ranges
LAYERS = [(3, 3, 3, 0, 0), (4, 4, 2, 1, 1), (4, 3, 2, 2, 0)]
# (src heads, dst heads, num_heads, src_head, dst_head): whole, and re-sharding by TP
HEADS = [(4, 4, 4, 0, 0), (4, 2, 2, 2, 0), (2, 4, 2, 0, 2), (4, 4, 1, 3, 1)]


def _cache(layers, blocks, heads, dtype, device, seed, block_size=4, head_dim=8):
    gen = torch.Generator().manual_seed(seed)
    shape = (layers, 2, blocks, block_size, heads, head_dim)
    return torch.randn(shape, generator=gen).to(device, dtype)


def _table(kind: str, n: int, num_blocks: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "contiguous":
        return torch.arange(3, 3 + n)
    if kind == "every_other":
        return torch.arange(1, 2 * n, 2)
    if kind == "reversed":
        return torch.arange(n - 1, -1, -1) + 5
    if kind == "permutation":
        return torch.randperm(n, generator=gen)
    return torch.randperm(num_blocks, generator=gen)[:n]


def _naive(dst, dst_blocks, src, src_blocks, num_layers, dst_layer, src_layer, num_heads,
           dst_head, src_head):  # fmt: skip
    """What the copy must do, one block, layer and K/V at a time."""
    out = dst.clone()
    for d, s in zip(dst_blocks.tolist(), src_blocks.tolist(), strict=True):
        for layer in range(num_layers):
            for kv in range(2):
                src_heads = src[src_layer + layer, kv, s, :, src_head : src_head + num_heads]
                out[dst_layer + layer, kv, d, :, dst_head : dst_head + num_heads] = src_heads
    return out


def _case(table, layers, heads, dtype, device, packed=False, n=6):
    """(dst, dst_blocks, src, src_blocks, region kwargs) for one combination."""
    src_layers, dst_layers, num_layers, src_layer, dst_layer = layers
    src_heads, dst_heads, num_heads, src_head, dst_head = heads
    dst_blocks = _table(table, n, 16, seed=1)
    if packed:  # a staging buffer holding exactly the chunk: ids 0..n-1
        src = _cache(num_layers, n, num_heads, dtype, device, seed=2)
        src_blocks, src_layer, src_head = torch.arange(n), 0, 0
    else:
        src = _cache(src_layers, 16, src_heads, dtype, device, seed=2)
        src_blocks = _table("permutation" if table == "contiguous" else "random", n, 16, seed=3)
    dst = _cache(dst_layers, 16, dst_heads, dtype, device, seed=4)
    region = dict(num_layers=num_layers, dst_layer=dst_layer, src_layer=src_layer,
                  num_heads=num_heads, dst_head=dst_head, src_head=src_head)  # fmt: skip
    return dst, dst_blocks, src, src_blocks, region


# -- torch reference (CPU) -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("packed", [False, True])
def test_reference_equals_naive_loop(dtype, table, layers, heads, packed):
    dst, dst_blocks, src, src_blocks, region = _case(table, layers, heads, dtype, "cpu", packed)
    expected = _naive(dst, dst_blocks, src, src_blocks, **region)
    copy_kv_blocks_ref(dst, dst_blocks, src, src_blocks, **region)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_dispatch_on_cpu_and_defaults(id_dtype):
    """On CPU `copy_kv_blocks` is the reference; layers and heads default to the source's."""
    src, dst = _cache(2, 8, 2, torch.float16, "cpu", 0), _cache(2, 8, 2, torch.float16, "cpu", 1)
    ids_dst, ids_src = torch.tensor([7, 0, 3], dtype=id_dtype), torch.tensor([1, 2, 5])
    expected = _naive(dst, ids_dst, src, ids_src, 2, 0, 0, 2, 0, 0)
    copy_kv_blocks(dst, ids_dst, src, ids_src.to(id_dtype))
    assert torch.equal(dst, expected)


def test_rejects_what_does_not_fit():
    cache = _cache(2, 8, 2, torch.float16, "cpu", 0)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="layers"):
        copy_kv_blocks(cache, ids, cache.clone(), ids, src_layer=1, num_layers=2)
    with pytest.raises(ValueError, match="heads"):
        copy_kv_blocks(cache, ids, cache.clone(), ids, dst_head=1, num_heads=2)
    with pytest.raises(ValueError, match="must match"):
        copy_kv_blocks(cache, ids, cache.float(), ids)
    with pytest.raises(ValueError, match="one length"):
        copy_kv_blocks(cache, ids, cache.clone(), ids[:1])
    with pytest.raises(ValueError, match="int32 or int64"):
        copy_kv_blocks(cache, ids, cache.clone(), ids.float())


# -- Triton kernel (GPU; TRITON_INTERPRET=1 on CPU) --------------------------------------------------


def _triton(dst, dst_blocks, src, src_blocks, **region):
    from pdray.kernels.kv_copy import copy_kv_blocks_triton

    copy_kv_blocks_triton(dst, dst_blocks, src, src_blocks, **region)


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("packed", [False, True])
def test_kernel_equals_reference(device, dtype, table, layers, heads, packed):
    dst, dst_blocks, src, src_blocks, region = _case(table, layers, heads, dtype, device, packed)
    expected = dst.clone()
    copy_kv_blocks_ref(expected, dst_blocks, src, src_blocks, **region)
    _triton(dst, dst_blocks.to(device, torch.int32), src, src_blocks.to(device), **region)
    assert torch.equal(dst, expected)


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize(
    ("block_size", "heads", "head_dim", "dtype", "head_range"),
    [
        (16, 8, 128, torch.bfloat16, None),  # Llama-3-8B blocks: 4 tiles of 8 KiB per block
        (16, 8, 128, torch.bfloat16, (3, 5)),  # two heads of eight: 16 rows of 512 bytes
        (4, 3, 3, torch.float16, None),  # 6-byte heads: 2-byte words
        (4, 3, 3, torch.float16, (1, 2)),
        (2, 5, 1, torch.float32, (1, 4)),  # 4-byte words, odd offsets
        (32, 2, 80, torch.float16, (1, 2)),  # 160-byte rows at a 160-byte offset
    ],
)
def test_kernel_word_sizes_and_tiles(device, block_size, heads, head_dim, dtype, head_range):
    gen = torch.Generator().manual_seed(block_size * heads)
    shape = (3, 2, 24, block_size, heads, head_dim)
    src = torch.randn(shape, generator=gen).to(device, dtype)
    dst = torch.randn(shape, generator=gen).to(device, dtype)
    start, stop = head_range or (0, heads)
    region = dict(num_layers=2, src_layer=1, dst_layer=0, num_heads=stop - start,
                  src_head=start, dst_head=start)  # fmt: skip
    src_blocks, dst_blocks = torch.randperm(24, generator=gen)[:11], torch.arange(0, 22, 2)
    expected = dst.clone()
    copy_kv_blocks_ref(expected, dst_blocks, src, src_blocks, **region)
    _triton(dst, dst_blocks.to(device), src, src_blocks.to(device), **region)
    assert torch.equal(dst, expected)


@pytest.mark.gpu
@NEEDS_GPU
def test_pack_then_scatter_round_trip(device):
    """ucx's path: gather into a packed buffer, scatter it into fragmented destination blocks."""
    src = _cache(4, 32, 4, torch.bfloat16, device, 0)
    dst = _cache(4, 32, 2, torch.bfloat16, device, 1)
    src_blocks, dst_blocks = torch.arange(20, 4, -2), torch.arange(1, 17, 2)
    packed = torch.empty(4, 2, 8, 4, 2, 8, dtype=torch.bfloat16, device=device)
    _triton(packed, torch.arange(8), src, src_blocks, src_head=2, num_heads=2)
    expected = dst.clone()
    copy_kv_blocks_ref(expected, dst_blocks, src, src_blocks, src_head=2, num_heads=2)
    _triton(dst, dst_blocks, packed, torch.arange(8))
    assert torch.equal(dst, expected)


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_reads_a_peer_gpu():
    """The receiver's case: the kernel runs on the destination's GPU and reads the source's."""
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPU 0 cannot access GPU 1")
    with cupy.cuda.Device(0), contextlib.suppress(cupy.cuda.runtime.CUDARuntimeError):
        cupy.cuda.runtime.deviceEnablePeerAccess(1)  # raises if already enabled
    src = _cache(2, 16, 2, torch.bfloat16, "cuda:1", 0)
    dst = _cache(2, 16, 2, torch.bfloat16, "cuda:0", 1)
    src_blocks, dst_blocks = torch.arange(15, 3, -1), torch.arange(0, 12)
    expected = dst.clone()
    copy_kv_blocks_ref(expected, dst_blocks, src, src_blocks)
    copy_kv_blocks(dst, dst_blocks, src, src_blocks)
    torch.cuda.synchronize(0)
    assert torch.equal(dst, expected)
