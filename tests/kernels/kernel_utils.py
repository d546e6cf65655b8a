"""Shared helpers of the kernel tests.

Kernel tests run on a CUDA GPU. Without one they run on the CPU through Triton's interpreter
(`TRITON_INTERPRET=1`, which tests/conftest.py sets when Triton is installed, as the `test` extra
does: CI runs them so), except the bf16 cases, CUDA graphs and two-GPU tests; with neither a GPU
nor Triton they are skipped before Triton is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a CUDA GPU")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Triton's interpreter computes bf16 dots wrongly (numpy has no bf16): those run on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device, gen
) -> torch.Tensor:
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)


def random_tables(seq_lens: list[int], block_size: int, num_blocks: int, gen) -> torch.Tensor:
    """Block tables [S, max_blocks] int32 of distinct, shuffled blocks, padded with 0."""
    need = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n]
        used += n
    return tables
