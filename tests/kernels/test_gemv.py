"""The decode GEMV / skinny GEMM (kernels/gemv.py) against float64 and `F.linear` references.

Each output must lie within an element-wise bound: the output's rounding (u |ref|, u = 2^-8 for
bf16, 2^-11 for fp16) plus float32 accumulation over K (K 2^-24 sum_k |x_k w_k|, the worst case),
and its relative L2 error against `F.linear` in the same dtype must be below TOLERANCE[dtype].
Outputs are preallocated full of NaN, so an unwritten element fails. Shapes cover M 1..300, N not a
power of two, K of Llama-3-8B's layers and tails; under TRITON_INTERPRET=1 (CPU) only small shapes
and fp16 (the interpreter rounds bf16 conversions toward zero).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import HAS_CUDA, INTERPRET, NEEDS_GPU, TOLERANCE, rel_error

pytestmark = [pytest.mark.gpu, NEEDS_GPU]

DTYPES = [torch.float16] + ([] if INTERPRET else [torch.bfloat16])
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
M_VALUES = [1, 3, 16, 64, 300]
SMALL_NK = [(40, 96), (33, 200)]
LARGE_NK = [(6144, 4096), (4096, 14336), (1000, 4104), (257, 1000)]
NK = SMALL_NK if INTERPRET else SMALL_NK + LARGE_NK


def check_linear(got, x, weight, bias, dtype, sum_unit: float = 2.0**-24) -> None:
    """got [M, N] against x @ weight.T + bias in float64 (weight [N, K]) within the element-wise
    bound above; `sum_unit` is the rounding unit of the accumulation (float32 by default)."""
    x64, w64 = x.double(), weight.double()
    ref = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    if bias is not None:
        ref += bias.double()
        magnitude += bias.double().abs()
    assert got.shape == ref.shape and got.dtype == dtype, (got.shape, got.dtype)
    assert torch.isfinite(got).all(), "non-finite outputs (an element left unwritten?)"
    k = x.shape[-1]
    bound = UNIT[dtype] * ref.abs() + k * sum_unit * magnitude + 1e-6
    excess = (got.double() - ref).abs() - bound
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"element {divmod(worst.item(), ref.shape[1])}: got {got.flatten()[worst].item():.6g}, "
        f"want {ref.flatten()[worst].item():.6g} +- {bound.flatten()[worst].item():.3g}"
    )


def _randn(gen, *shape, dtype, device) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("m", M_VALUES if not INTERPRET else [1, 3, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(device, dtype, n, k, m, with_bias):
    from pdray.kernels.gemv import linear

    gen = torch.Generator().manual_seed(m * 7919 + n + k)
    x = _randn(gen, m, k, dtype=dtype, device=device)
    weight = _randn(gen, n, k, dtype=dtype, device=device) / k**0.5
    bias = _randn(gen, n, dtype=dtype, device=device) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    got = linear(x, weight, bias, out=out)
    assert got.data_ptr() == out.data_ptr()
    check_linear(got, x, weight, bias, dtype)
    error = rel_error(got, F.linear(x, weight, bias))
    assert error < TOLERANCE[dtype], f"relative error {error:.3g} against F.linear"


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_each_variant_and_leading_dims(device, use_dot, m):
    """Both inner loops at several block shapes, on x [2, m, K] (leading dims kept), K not a
    multiple of BLOCK_K and N not of BLOCK_N."""
    from pdray.kernels.gemv import GemvConfig, linear

    gen = torch.Generator().manual_seed(m)
    x = _randn(gen, 2, m, 160, dtype=torch.float16, device=device)
    weight = _randn(gen, 72, 160, dtype=torch.float16, device=device) / 16
    for block_n, block_k in ((16, 64), (32, 128)):
        config = GemvConfig(4, block_n, block_k, use_dot, num_warps=4, num_stages=2)
        got = linear(x, weight, config=config)
        assert got.shape == (2, m, 72)
        check_linear(got.reshape(2 * m, 72), x.reshape(2 * m, 160), weight, None, torch.float16)


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("m", [1, 8])
def test_captured_in_a_cuda_graph(m):
    """Replaying a captured call computes the product of whatever x holds at replay."""
    from pdray.kernels.gemv import linear

    gen = torch.Generator().manual_seed(m)
    weight = _randn(gen, 4096, 4096, dtype=torch.bfloat16, device="cuda") / 64
    x = _randn(gen, m, 4096, dtype=torch.bfloat16, device="cuda")
    linear(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, weight)
    x.copy_(_randn(gen, m, 4096, dtype=torch.bfloat16, device="cuda"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_linear(out, x, weight, None, torch.bfloat16)


def test_supports(device):
    from pdray.kernels.gemv import MAX_M, supports

    w = torch.zeros(64, 128, dtype=torch.bfloat16, device=device)
    x = torch.zeros(MAX_M, 128, dtype=torch.bfloat16, device=device)
    on_gpu = device == "cuda"
    assert supports(x, w) is on_gpu
    assert supports(x[:1], w) is on_gpu
    assert not supports(torch.zeros(MAX_M + 1, 128, dtype=torch.bfloat16, device=device), w)
    assert not supports(x.float(), w.float())  # fp32 stays with cuBLAS
    assert not supports(x[:, :100], w[:, :100])  # rows not 16-byte aligned
    assert not supports(x, w.t().contiguous().t())  # column-major weight
