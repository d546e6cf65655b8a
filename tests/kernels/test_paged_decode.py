"""Split-KV paged decode attention equals the torch reference across shapes, splits and dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DTYPES, NEEDS_GPU, TOLERANCE, random_cache, random_tables, rel_error

pytestmark = [pytest.mark.gpu, NEEDS_GPU]

# (num_heads, num_kv_heads, head_dim, block_size)
SHAPES = [(8, 8, 64, 16), (32, 8, 128, 16), (14, 2, 64, 32), (4, 1, 128, 16), (6, 2, 80, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 4, 16])
@pytest.mark.parametrize("sliding_window", [None, 50])
def test_decode_matches_reference(device, dtype, shape, num_splits, sliding_window):
    from pdray.kernels.paged_decode import paged_decode_attention
    from pdray.kernels.reference import paged_attention_ref

    num_heads, num_kv_heads, head_dim, block_size = shape
    gen = torch.Generator().manual_seed(num_heads * 131 + num_splits)
    seq_lens = [1, 17, 300, 64, 129, 700][: 3 + num_splits % 4]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 8
    cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen)
    tables = random_tables(seq_lens, block_size, num_blocks, gen).to(device)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(device, dtype)
    scale = head_dim**-0.5
    expected = paged_attention_ref(
        query, cache, tables, seq_lens, [1] * len(seq_lens), scale, sliding_window
    )
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(
        query,
        cache,
        tables,
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale,
        sliding_window,
        num_splits,
        out=out,
    )
    assert rel_error(out, expected) < TOLERANCE[dtype]


def test_padded_rows_are_finite(device):
    """CUDA-graph padding: a sequence of length 0 yields zeros, never NaN."""
    from pdray.kernels.paged_decode import paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    cache = random_cache(8, 16, 2, 64, torch.float16, device, gen)
    tables = torch.zeros(3, 4, dtype=torch.int32, device=device)
    seq_lens = torch.tensor([20, 0, 0], dtype=torch.int32, device=device)
    query = torch.randn(3, 4, 64, generator=gen).to(device, torch.float16)
    for splits in (1, 8):
        out = paged_decode_attention(query, cache, tables, seq_lens, 0.125, None, splits)
        assert torch.isfinite(out).all() and not out[1:].any()


def test_choose_num_splits():
    from pdray.kernels.paged_decode import MAX_SPLITS, choose_num_splits

    assert choose_num_splits(256, 8, 2048, 132) == 1
    assert choose_num_splits(1, 8, 2048, 132) == 16  # 128 tokens a split
    assert choose_num_splits(16, 8, 1 << 20, 132) == 4
    assert choose_num_splits(1, 1, 1 << 20, 132) == MAX_SPLITS
    assert choose_num_splits(1, 8, 100, 132) == 1
