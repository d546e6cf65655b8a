"""Weight-only int4 linear (kernels/int4_gemm.py) against `int4_linear_reference` and float64.

Weights come from `quantize` (symmetric and asymmetric, group sizes 32/64/128). Each output must lie
within the element-wise bound of test_gemv (output rounding, float32 accumulation over K) of the
float64 product with the weight its path multiplies: the exact (code - zero) * scale for GEMV, that
rounded to x's dtype (as `dequantize` and the reference round it) for GEMM and DEQUANT_MATMUL; and
its relative L2 error against `int4_linear_reference` must be below TOLERANCE[dtype]. Outputs start as NaN. Every path is run at
every M it can take; under TRITON_INTERPRET=1 (CPU) only small shapes and fp16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_utils import HAS_CUDA, INTERPRET, NEEDS_GPU, TOLERANCE, rel_error
from test_gemv import DTYPES, UNIT, check_linear

from pdray.quantization.int4 import Int4Weight, dequantize, int4_linear_reference, quantize

pytestmark = [pytest.mark.gpu, NEEDS_GPU]

# one path each under the interpreter: GEMV (1), GEMM (3), DEQUANT_MATMUL (300)
M_VALUES = [1, 3, 300] if INTERPRET else [1, 3, 16, 64, 300]
SMALL_NK = [(33, 384)]  # 384: a tail of groups for every block size
LARGE_NK = [(40, 256), (6144, 4096), (4096, 14336), (1000, 4224)]  # 4224 = 33 groups of 128
NK = SMALL_NK if INTERPRET else SMALL_NK + LARGE_NK


def _weight(gen, n, k, group_size, dtype, device, symmetric=False) -> Int4Weight:
    q = quantize(torch.randn(n, k, generator=gen) / k**0.5, group_size, symmetric)
    return Int4Weight(q.qweight.to(device), q.scales.to(device, dtype), q.zeros.to(device, dtype))


def _check(got, x, q, bias, dtype, path) -> None:
    from pdray.kernels.int4_gemm import Int4Path

    weight = dequantize(q, torch.float64 if path is Int4Path.GEMV else dtype)
    # cuBLAS may reduce split-K partial sums in x's dtype (torch's default for bf16/fp16)
    sum_unit = UNIT[dtype] / x.shape[-1] if path is Int4Path.DEQUANT_MATMUL else 2.0**-24
    check_linear(got, x, weight, bias, dtype, sum_unit)
    error = rel_error(got, int4_linear_reference(x, q, bias))
    assert error < TOLERANCE[dtype], f"relative error {error:.3g} against the reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_linear_matches_reference(device, dtype, n, k, group_size, m, with_bias):
    """The path int4_linear picks for M."""
    from pdray.kernels.int4_gemm import choose_path, int4_linear

    gen = torch.Generator().manual_seed(m * 7919 + n + k + group_size)
    q = _weight(gen, n, k, group_size, dtype, device, symmetric=with_bias)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    got = int4_linear(x, q, bias, out=out)
    assert got.data_ptr() == out.data_ptr()
    _check(got, x, q, bias, dtype, choose_path(m))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("m", [1, 3] if INTERPRET else [1, 3, 17])
@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant_matmul"])
def test_every_path_at_every_m(device, dtype, group_size, m, path):
    """Each path forced, on x [2, m, K] (leading dims kept), with and without inline PTX."""
    from pdray.kernels.int4_gemm import Int4Config, Int4Path, int4_linear

    gen = torch.Generator().manual_seed(m + group_size)
    q = _weight(gen, 48, 384, group_size, dtype, device)
    x = torch.randn(2, m, 384, generator=gen).to(device, dtype)
    configs = [None]
    if path == "gemv":
        configs += [Int4Config(1, 8, 2, 4, 2, inline_asm=False),
                    Int4Config(1, 4, 1, 2, 1, inline_asm=not INTERPRET, words_per_chunk=1),
                    Int4Config(1, 16, 2, 4, 1, inline_asm=not INTERPRET, words_per_chunk=2),
                    # a step's chunks span the warps: each thread holds all rows of its chunk
                    Int4Config(1, 8, 8, 4, 1, inline_asm=not INTERPRET, words_per_chunk=1),
                    Int4Config(1, 4, 32, 4, 1, inline_asm=not INTERPRET),
                    # x held by each program, which walks tiles of rows (12 tiles, 8 or 5
                    # programs under the interpreter: some take two tiles, some one)
                    Int4Config(1, 4, 1, 4, 1, inline_asm=not INTERPRET, programs_per_sm=2),
                    Int4Config(1, 8, 1, 2, 1, inline_asm=False, words_per_chunk=1,
                               programs_per_sm=1)]  # fmt: skip
    if path == "gemm":
        configs += [Int4Config(16, 16, 1, 4, 2, inline_asm=not INTERPRET),
                    Int4Config(32, 32, 2, 4, 2, inline_asm=False),
                    # split-K: 3 groups of 128 (12 of 32) over 2-3 splits, the last one shorter
                    # (or empty splits dropped: 16 asked, at most one step each)
                    Int4Config(16, 16, 1, 4, 2, inline_asm=not INTERPRET, split_k=2),
                    Int4Config(16, 32, 1, 4, 2, inline_asm=False, split_k=3),
                    Int4Config(16, 16, 1, 4, 2, inline_asm=not INTERPRET, split_k=16)]  # fmt: skip
    for config in configs:
        got = int4_linear(x, q, path=Int4Path(path), config=config)
        assert got.shape == (2, m, 48)
        _check(got.reshape(2 * m, 48), x.reshape(2 * m, 384), q, None, dtype, Int4Path(path))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_matmul_in_slices_of_rows(device, dtype, monkeypatch):
    """DEQUANT_MATMUL with a weight larger than its scratch: slices of 20 rows (48 = 20 + 20 + 8),
    with a bias, within the bounds of the whole product (and close to the one-piece result:
    cuBLAS may round a narrower matmul differently)."""
    from pdray.kernels import int4_gemm

    gen = torch.Generator().manual_seed(3)
    q = _weight(gen, 48, 384, 128, dtype, device)
    x = torch.randn(300, 384, generator=gen).to(device, dtype)
    bias = torch.randn(48, generator=gen).to(device, dtype)
    whole = int4_gemm.int4_linear(x, q, bias, path=int4_gemm.Int4Path.DEQUANT_MATMUL)
    monkeypatch.setattr(int4_gemm, "_SCRATCH_ELEMENTS", 20 * 384)
    out = torch.full((300, 48), float("nan"), dtype=dtype, device=device)
    got = int4_gemm.int4_linear(x, q, bias, out=out, path=int4_gemm.Int4Path.DEQUANT_MATMUL)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any()
    _check(got, x, q, bias, dtype, int4_gemm.Int4Path.DEQUANT_MATMUL)
    assert rel_error(got, whole) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_the_reference(device, dtype, group_size):
    from pdray.kernels.int4_gemm import dequantize as dequantize_kernel

    gen = torch.Generator().manual_seed(group_size)
    q = _weight(gen, 70, 256 + group_size, group_size, dtype, device)
    assert torch.equal(dequantize_kernel(q, dtype), dequantize(q, dtype))


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("m", "split_k"), [(1, 1), (8, 1), (8, 4), (64, 8)])
def test_captured_in_a_cuda_graph(m, split_k):
    """Replayed twice with new inputs: split-K's arrival counters re-arm between launches."""
    from pdray.kernels.int4_gemm import choose_path, default_config, int4_linear

    gen = torch.Generator().manual_seed(m)
    q = _weight(gen, 4096, 4096, 128, torch.bfloat16, "cuda")
    x = torch.randn(m, 4096, generator=gen).to("cuda", torch.bfloat16)
    path = choose_path(m)
    config = default_config(path, m, 128, 4096, 4096)
    if split_k > 1:
        config = dataclasses.replace(config, split_k=split_k)
    int4_linear(x, q, config=config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_linear(x, q, config=config)
    for _ in range(2):
        x.copy_(torch.randn(m, 4096, generator=gen))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, q, None, torch.bfloat16, path)


def test_rejects_what_it_cannot_compute(device):
    from pdray.kernels.int4_gemm import int4_linear

    gen = torch.Generator().manual_seed(0)
    q = _weight(gen, 8, 256, 64, torch.float16, device)
    with pytest.raises(ValueError, match="features"):
        int4_linear(torch.zeros(1, 128, dtype=torch.float16, device=device), q)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        int4_linear(torch.zeros(1, 256, device=device), q)
    wide = _weight(gen, 8, 512, 256, torch.float16, device)
    with pytest.raises(ValueError, match="32, 64 or 128"):
        int4_linear(torch.zeros(1, 512, dtype=torch.float16, device=device), wide)
