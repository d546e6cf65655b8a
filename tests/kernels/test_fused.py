"""Fused small ops (kernels/fused.py) and the layers that dispatch to them on CUDA, against
references written here in plain float32 torch, independent of pdray's layers: on a CUDA tensor
`pdray.layers` themselves run the fused kernels, so they cannot be the reference.

References: RMSNorm x * rsqrt(mean(x^2) + eps) * w (after the residual add when fused with it);
SiluAndMul silu(gate) * up over [gate | up]; rotary in the formula of transformers,
x * cos + rotate(x) * sin, with `rotate_half` for neox heads and the every-two rotation for
interleaved (GPT-J) heads. pdray rotates whole heads (no partial rotary). Tolerances: relative
L2 error below TOLERANCE[dtype] (float32 1e-4, float16 5e-3, bfloat16 2e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import DTYPES, NEEDS_GPU, TOLERANCE, rel_error

from pdray.layers.activation import SiluAndMul
from pdray.layers.norm import RMSNorm
from pdray.layers.rotary import RotaryEmbedding

pytestmark = [pytest.mark.gpu, NEEDS_GPU]

EPS = 1e-5


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_ref(x, positions, cos, sin, interleaved: bool) -> torch.Tensor:
    """x [T, H, D]; cos/sin tables [P, D/2] (one angle per rotated pair)."""
    x = x.float()
    cos, sin = cos[positions].unsqueeze(1).float(), sin[positions].unsqueeze(1).float()
    if interleaved:  # pairs (0, 1), (2, 3), ...: each angle covers two adjacent dims
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:  # pairs (i, i + D/2)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _randn(gen, *shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == dtype and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    error = rel_error(got, ref)
    assert error < TOLERANCE[dtype], f"{what}: relative error {error:.3g} >= {TOLERANCE[dtype]}"


NORM_SHAPES = [(1, 4096), (7, 896), (33, 256), (4, 100), (2, 5120)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), NORM_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, num_tokens, hidden, with_residual):
    """The kernel, then the RMSNorm layer (which dispatches to it on CUDA), against the reference;
    with a residual both outputs: norm(x + residual) and x + residual."""
    from pdray.kernels.fused import rms_norm

    gen = torch.Generator().manual_seed(hidden)
    weight = _randn(gen, hidden, device=device, dtype=dtype)
    x = _randn(gen, num_tokens, hidden, device=device, dtype=dtype)
    res = _randn(gen, num_tokens, hidden, device=device, dtype=dtype) if with_residual else None
    x_before = x.clone()
    layer = RMSNorm(hidden, EPS).to(device, dtype)
    layer.weight.data = weight
    for name, got in (("kernel", rms_norm(x, weight, EPS, res)), ("layer", layer(x, res))):
        if res is None:
            _check(got, rms_norm_ref(x, weight, EPS), dtype, name)
        else:
            normed, summed = got
            want_sum = x.float() + res.float()
            _check(summed, want_sum, dtype, f"{name} residual")
            # the sum is normalised as stored (in dtype), as the unfused layer does
            _check(normed, rms_norm_ref(want_sum.to(dtype), weight, EPS), dtype, name)
    assert torch.equal(x, x_before), "the input was modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "d"), [(1, 14336), (5, 768), (3, 100), (17, 4864)])
def test_silu_and_mul(device, dtype, num_tokens, d):
    from pdray.kernels.fused import silu_and_mul

    gen = torch.Generator().manual_seed(d)
    x = _randn(gen, num_tokens, 2 * d, device=device, dtype=dtype) * 3
    want = silu_and_mul_ref(x)
    _check(silu_and_mul(x), want, dtype, "kernel")
    _check(SiluAndMul()(x), want, dtype, "layer")


ROTARY_SHAPES = [(32, 8, 128), (14, 2, 64), (8, 2, 80), (16, 1, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), ROTARY_SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_rotary(device, dtype, interleaved, num_heads, num_kv_heads, head_dim, num_tokens):
    """q and k are views into one fused qkv tensor (strided over tokens and heads), as in the
    attention layers; positions anywhere in the table."""
    from pdray.kernels.fused import rotary

    gen = torch.Generator().manual_seed(head_dim + num_tokens)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, interleaved=interleaved).to(device)
    qkv = _randn(gen, num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device,
                 dtype=dtype)  # fmt: skip
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    qkv_before = qkv.clone()
    want_q = rotary_ref(q, positions, rope.cos, rope.sin, interleaved)
    want_k = rotary_ref(k, positions, rope.cos, rope.sin, interleaved)
    kernel = rotary(positions, q, k, rope.cos, rope.sin, interleaved)
    for name, (got_q, got_k) in (("kernel", kernel), ("layer", rope(positions, q, k))):
        _check(got_q, want_q, dtype, f"{name} q")
        _check(got_k, want_k, dtype, f"{name} k")
    assert torch.equal(qkv, qkv_before), "q or k was modified in place"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), ROTARY_SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_rotary_write_kv(device, dtype, interleaved, num_heads, num_kv_heads, head_dim, num_tokens):
    """Rotary and the KV write in one launch: the rotated q returned, the rotated k and the plain v
    in their cache slots (those of the reference: rotary_ref, then the cache written with index
    assignment), padding slots (-1) writing nothing and every other slot left as it was."""
    from pdray.kernels.fused import rotary_write_kv

    gen = torch.Generator().manual_seed(3 * head_dim + num_tokens)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, interleaved=interleaved).to(device)
    qkv = _randn(gen, num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device,
                 dtype=dtype)  # fmt: skip
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads :]
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    num_blocks, block_size = 8, 16
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::4] = -1  # padded rows of a CUDA-graph batch
    cache = _randn(gen, 2, num_blocks, block_size, num_kv_heads, head_dim, device=device,
                   dtype=dtype)  # fmt: skip
    expected = cache.clone().view(2, -1, num_kv_heads, head_dim)
    keep = slots >= 0
    want_k = rotary_ref(k, positions, rope.cos, rope.sin, interleaved)
    expected[0, slots[keep]] = want_k[keep.to(device)].to(dtype)
    expected[1, slots[keep]] = v[keep.to(device)]
    got_q = rotary_write_kv(positions, q, k, v, rope.cos, rope.sin, interleaved, cache,
                            slots.to(device))  # fmt: skip
    _check(got_q, rotary_ref(q, positions, rope.cos, rope.sin, interleaved), dtype, "q")
    got = cache.view(2, -1, num_kv_heads, head_dim)
    written = torch.zeros(got.shape[1], dtype=torch.bool)
    written[slots[keep]] = True
    assert torch.equal(got[:, ~written.to(device)], expected[:, ~written.to(device)])
    assert torch.equal(got[1], expected[1]), "v is copied as it is"
    _check(got[0, slots[keep]], want_k[keep.to(device)], dtype, "k in the cache")
