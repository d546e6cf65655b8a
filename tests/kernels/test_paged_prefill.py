"""Paged prefill attention equals the torch reference: fresh prompts, prefix-cache hits, chunks
and decode rows mixed in one launch, GQA, sliding window, several dtypes."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DTYPES, NEEDS_GPU, TOLERANCE, random_cache, random_tables, rel_error

pytestmark = [pytest.mark.gpu, NEEDS_GPU]

# (num_heads, num_kv_heads, head_dim, block_size)
SHAPES = [(4, 4, 64, 16), (8, 2, 128, 16), (6, 2, 80, 32)]
# (query_len, seq_len): fresh prompt, prefix hit, chunk in the middle, decode row, single token
BATCHES = {
    "fresh": [(70, 70), (1, 1), (130, 130)],
    "mixed": [(33, 100), (1, 57), (64, 64), (5, 300), (1, 1)],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("sliding_window", [None, 40])
def test_prefill_matches_reference(device, dtype, shape, batch, sliding_window):
    from pdray.kernels.paged_prefill import paged_prefill_attention
    from pdray.kernels.reference import paged_attention_ref

    num_heads, num_kv_heads, head_dim, block_size = shape
    query_lens = [q for q, _ in BATCHES[batch]]
    seq_lens = [s for _, s in BATCHES[batch]]
    gen = torch.Generator().manual_seed(num_heads + len(batch))
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 4
    cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen)
    tables = random_tables(seq_lens, block_size, num_blocks, gen).to(device)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(device, dtype)
    starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    scale = head_dim**-0.5
    expected = paged_attention_ref(
        query, cache, tables, seq_lens, query_lens, scale, sliding_window
    )
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(
        query,
        cache,
        starts.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        tables,
        max(query_lens),
        scale,
        sliding_window,
        out=out,
    )
    assert rel_error(out, expected) < TOLERANCE[dtype]
