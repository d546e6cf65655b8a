"""The wint4 format and its pieces, without an engine: pack/unpack, round-to-nearest error bounds,
group sizes, AWQ/GPTQ tensors converted to pdray's layout (against packers written from the
formats' definitions in int4_checkpoints.py), and the checks of quantization_config."""

from __future__ import annotations

import pytest
import torch
from int4_checkpoints import (
    awq_pack_columns,
    dequantized,
    gptq_pack_columns,
    gptq_pack_rows,
    rtn,
)

from pdray.config import EngineConfig, Quantization
from pdray.quantization.checkpoint import Int4CheckpointReader
from pdray.quantization.int4 import choose_group_size, dequantize, pack, quantize, unpack
from pdray.quantization.spec import Int4Source, Int4Spec, checkpoint_int4_spec


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (6, 64), generator=torch.Generator().manual_seed(0))
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(unpack(packed), codes.to(torch.uint8))
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # column 0 low, column 1 high


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_round_to_nearest_error_is_at_most_half_a_step(group_size, symmetric):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(group_size))
    q = quantize(w, group_size, symmetric)
    assert q.group_size == group_size
    assert torch.equal(q.zeros, q.zeros.round()) and q.zeros.min() >= 0 and q.zeros.max() <= 15
    if symmetric:
        assert torch.all(q.zeros == 8)
    step = q.scales.repeat_interleave(group_size, dim=1)
    error = (dequantize(q, torch.float32) - w).abs()
    assert torch.all(error <= 0.5 * step * (1 + 1e-5) + 1e-7)
    # the same codes as the definition written independently in int4_checkpoints.rtn
    codes, zeros, scales = rtn(w, group_size, symmetric)
    assert (unpack(q.qweight).long() != codes).float().mean() < 1e-3  # ties may round apart
    assert torch.allclose(dequantize(q, torch.float32), dequantized(codes, zeros, scales,
                          group_size), atol=float(q.scales.max()) + 1e-6)  # fmt: skip


def test_asymmetric_beats_symmetric_on_gaussian_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    errors = [(dequantize(quantize(w, 128, s), torch.float32) - w).pow(2).mean() for s in (0, 1)]
    assert errors[0] < 0.9 * errors[1]


@pytest.mark.parametrize(
    ("in_features", "size"), [(4096, 128), (14336, 128), (192, 64), (96, 32), (64, 64)]
)
def test_group_size_choice(in_features, size):
    assert choose_group_size(in_features) == size
    assert Int4Spec(Int4Source.RTN).group_size_for(in_features, "layer") == size


def test_group_size_refuses_features_not_divisible_by_32():
    with pytest.raises(ValueError, match="multiple of 32; this one holds 48"):
        Int4Spec(Int4Source.RTN).group_size_for(48, "RowParallelLinear")
    with pytest.raises(
        ValueError, match="awq checkpoint has groups of 128.*multiple of 128; this one holds 64"
    ):
        Int4Spec(Int4Source.AWQ, group_size=128).group_size_for(64, "RowParallelLinear")


def _random_int4(n: int, k: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen)
    scales = torch.rand(n, k // g, generator=gen).half() + 0.01
    return codes, zeros, scales


def _convert(reader: Int4CheckpointReader, tensors: dict[str, torch.Tensor]):
    out = {}
    for name, tensor in tensors.items():
        converted = reader.convert_tensor(f"layer.{name}", tensor)
        if converted is not None:
            out[converted[0].removeprefix("layer.")] = converted[1]
    return out


def test_awq_tensors_convert_to_pdray_layout():
    n, k, g = 24, 64, 32
    codes, zeros, scales = _random_int4(n, k, g, seed=2)
    reader = Int4CheckpointReader(Int4Spec(Int4Source.AWQ, group_size=g))
    out = _convert(reader, {
        "qweight": awq_pack_columns(codes.t()),  # [K, N // 8]
        "qzeros": awq_pack_columns(zeros.t()),
        "scales": scales.t().contiguous(),
    })  # fmt: skip
    assert set(out) == {"qweight", "zeros", "scales"}
    assert torch.equal(unpack(out["qweight"]).long(), codes)
    assert torch.equal(out["zeros"].long(), zeros)
    assert torch.equal(out["scales"], scales)


@pytest.mark.parametrize(("layout", "offset"), [("gptq", 1), ("gptq_v2", 0)])
def test_gptq_tensors_convert_to_pdray_layout(layout, offset):
    n, k, g = 16, 128, 64
    codes, zeros, scales = _random_int4(n, k, g, seed=3)
    zeros = zeros.clamp(min=offset)  # v1 stores zero - 1
    spec = checkpoint_int4_spec({"quant_method": "gptq", "bits": 4, "group_size": g,
                                 "desc_act": False, "sym": False, "checkpoint_format": layout})  # fmt: skip
    out = _convert(Int4CheckpointReader(spec), {
        "qweight": gptq_pack_rows(codes.t()),  # [K // 8, N]
        "qzeros": gptq_pack_columns((zeros - offset).t()),
        "scales": scales.t().contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32) // g,
    })  # fmt: skip
    assert set(out) == {"qweight", "zeros", "scales"}
    assert torch.equal(unpack(out["qweight"]).long(), codes)
    assert torch.equal(out["zeros"].long(), zeros)


def test_gptq_act_order_g_idx_is_refused():
    reader = Int4CheckpointReader(Int4Spec(Int4Source.GPTQ, group_size=32, zero_offset=1))
    g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32
    with pytest.raises(ValueError, match="act-order"):
        reader.convert_tensor("x.g_idx", g_idx)


@pytest.mark.parametrize(
    ("qcfg", "message"),
    [
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits=8"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
        ({"quant_method": "awq", "bits": 4, "group_size": 100}, "group_size=100"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False},
         "zero_point"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "desc_act"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size=-1"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
         "marlin"),
        ({"quant_method": "fp8"}, "'fp8' is not supported"),
    ],
)  # fmt: skip
def test_unsupported_quantization_configs_are_refused(qcfg, message):
    with pytest.raises(ValueError, match=message):
        checkpoint_int4_spec(qcfg)


def test_supported_quantization_configs():
    awq = checkpoint_int4_spec({"quant_method": "awq", "bits": 4, "group_size": 64,
                                "zero_point": True, "version": "GEMM"})  # fmt: skip
    assert awq == Int4Spec(Int4Source.AWQ, group_size=64)
    gptq = checkpoint_int4_spec({"quant_method": "gptq", "bits": 4, "group_size": 128,
                                 "desc_act": False, "sym": True})  # fmt: skip
    assert gptq == Int4Spec(Int4Source.GPTQ, group_size=128, symmetric=True, zero_offset=1)
    assert checkpoint_int4_spec(None) is None


def test_engine_argument_quantization():
    assert EngineConfig(model="dummy:tiny", quantization="wint4").quantization is Quantization.WINT4
    assert EngineConfig(model="dummy:tiny").quantization is None
    with pytest.raises(ValueError, match=r"`quantization` must be one of \[None, 'wint4'\]"):
        EngineConfig(model="dummy:tiny", quantization="int4")
