"""The KV run copy equals torch's copy_ for cache-to-cache and buffer-to-cache runs."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DTYPES, NEEDS_GPU

pytestmark = [pytest.mark.gpu, NEEDS_GPU]


def _cache(num_blocks, dtype, device, seed, shape=(4, 16, 2, 64)):
    layers, block_size, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    full = (layers, 2, num_blocks, block_size, heads, head_dim)
    return torch.randn(full, generator=gen).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("layers", "src_start", "dst_start", "n"),
    [((0, 4), 0, 0, 1), ((1, 3), 5, 20, 7), ((3, 4), 30, 2, 9), ((0, 4), 0, 10, 40)],
)
def test_cache_to_cache(device, dtype, layers, src_start, dst_start, n):
    from kernels.run_copy import copy_run

    src, dst = _cache(40, dtype, device, 0), _cache(64, dtype, device, 1)
    expected = dst.clone()
    lo, hi = layers
    src_view = src[lo:hi, :, src_start : src_start + n]
    expected[lo:hi, :, dst_start : dst_start + n].copy_(src_view)
    copy_run(dst[lo:hi, :, dst_start : dst_start + n], src_view)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("shape", [(2, 16, 8, 128), (3, 4, 1, 2), (2, 16, 3, 80)])
def test_buffer_to_cache_and_odd_shapes(device, shape):
    """A contiguous received buffer; rows of 16 bytes or fewer words than a tile; rows not a
    multiple of 8 bytes fall back to copy_."""
    from kernels.run_copy import copy_run

    dst = _cache(16, torch.float16, device, 2, shape)
    buffer = torch.randn(shape[0], 2, 5, *shape[1:]).to(device, torch.float16)
    expected = dst.clone()
    expected[:, :, 3:8] = buffer
    copy_run(dst[:, :, 3:8], buffer)
    assert torch.equal(dst, expected)


def test_rejects_mismatched_shapes(device):
    from kernels.run_copy import copy_run

    cache = _cache(8, torch.float16, device, 3)
    with pytest.raises(ValueError, match="cannot copy"):
        copy_run(cache[:, :, :2], cache[:, :, :3])
