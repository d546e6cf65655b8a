"""Fused small ops equal the plain-torch layers they replace (pdray.layers)."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DTYPES, NEEDS_GPU, TOLERANCE, rel_error

from pdray.layers.activation import SiluAndMul
from pdray.layers.norm import RMSNorm
from pdray.layers.rotary import RotaryEmbedding

pytestmark = [pytest.mark.gpu, NEEDS_GPU]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 4096), (7, 896), (33, 256)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, num_tokens, hidden, with_residual):
    from kernels.fused import rms_norm

    gen = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5).to(device, dtype)
    norm.weight.data = torch.randn(hidden, generator=gen).to(device, dtype)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, dtype)
    res = (
        torch.randn(num_tokens, hidden, generator=gen).to(device, dtype) if with_residual else None
    )
    expected = norm(x, res)
    got = rms_norm(x, norm.weight, 1e-5, res)
    if not with_residual:
        expected, got = (expected,), (got,)
    for e, g in zip(expected, got, strict=True):
        assert rel_error(g, e) < TOLERANCE[dtype] / 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "d"), [(1, 14336), (5, 768), (3, 100)])
def test_silu_and_mul(device, dtype, num_tokens, d):
    from kernels.fused import silu_and_mul

    x = torch.randn(num_tokens, 2 * d, generator=torch.Generator().manual_seed(d)).to(device, dtype)
    assert rel_error(silu_and_mul(x), SiluAndMul()(x)) < TOLERANCE[dtype] / 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (14, 2, 64)])
def test_rotary(device, dtype, interleaved, num_heads, num_kv_heads, head_dim):
    from kernels.fused import rotary

    gen = torch.Generator().manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, interleaved=interleaved).to(device)
    num_tokens = 9
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    qkv = qkv.to(device, dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    eq, ek = rope(positions, q, k)
    gq, gk = rotary(positions, q, k, rope.cos, rope.sin, interleaved)
    assert rel_error(gq, eq) < TOLERANCE[dtype] / 10
    assert rel_error(gk, ek) < TOLERANCE[dtype] / 10
