"""The Triton KV-cache write equals the torch reference, padding slots (-1) included."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DTYPES, NEEDS_GPU

pytestmark = [pytest.mark.gpu, NEEDS_GPU]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "num_kv_heads", "head_dim"),
    [(1, 1, 64), (37, 2, 128), (300, 8, 128), (5, 3, 80)],
)
def test_write_kv_matches_reference(device, dtype, num_tokens, num_kv_heads, head_dim):
    from pdray.kernels.kv_write import write_kv
    from pdray.kernels.reference import write_kv_ref

    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks, block_size = 64, 16
    # K and V as views into one fused projection, as the model hands them over
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(device, dtype)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1
    slots = slots.to(device)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    cache = cache.to(device, dtype)
    expected = cache.clone()
    write_kv_ref(key, value, expected, slots)
    write_kv(key, value, cache, slots)
    assert torch.equal(cache, expected)
