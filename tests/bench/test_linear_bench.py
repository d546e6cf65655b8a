"""The linear benchmark's pure parts (no GPU): arguments, byte counts, model sums, tables, grids."""

from __future__ import annotations

import pytest

from pdray.bench import linear as bench


def test_parse_args_defaults_and_errors():
    args = bench.parse_args([])
    assert args.decode_m == [1, 2, 4, 8, 16, 64] and args.prefill_m == [8192]
    assert not args.tune and args.out == "bench_linear.json"
    args = bench.parse_args(["--decode-m", "1", "3", "--tune", "--out", "t.json"])
    assert args.decode_m == [1, 3] and args.tune and args.out == "t.json"
    with pytest.raises(SystemExit):
        bench.parse_args(["--decode-m", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rep-ms", "0"])


def test_byte_counts():
    assert bench.weight_bytes(4096, 4096, int4=False) == 4096 * 4096 * 2
    # codes at half a byte, then bf16 scales and zeros per 128 columns
    assert bench.weight_bytes(4096, 4096, int4=True) == 4096 * 2048 + 2 * 4096 * 32 * 2
    assert bench.read_bytes(2, 10, 256, int4=False) == 10 * 256 * 2 + 2 * 2 * (256 + 10)
    assert bench.num_copies(1) == 64
    assert bench.num_copies(bench._ROTATE_BYTES) == 2
    assert bench.num_copies(bench._ROTATE_BYTES // 4) == 4


def test_model_rows_sum_layers_and_lm_head():
    rows = []
    for name in bench.LAYERS:
        rows.append({"m": 1, "layer": name, "method": "int4", "ms": 0.01,
                     "fraction_of_bandwidth": 0.5})  # fmt: skip
    rows.append({"m": 1, "layer": "lm_head", "method": "gemv", "ms": 0.2,
                 "fraction_of_bandwidth": 1.0})  # fmt: skip
    rows.append(
        {"m": 2, "layer": "qkv", "method": "int4", "ms": 1.0, "fraction_of_bandwidth": 1.0}
    )  # fmt: skip (M=2 lacks layers: left out)
    (model,) = bench.model_rows(rows, "int4", "gemv")
    layers = len(bench.LAYERS) * bench.NUM_LAYERS
    assert model["m"] == 1
    assert model["ms"] == pytest.approx(layers * 0.01 + 0.2)
    assert model["bound_ms"] == pytest.approx(layers * 0.005 + 0.2)
    assert model["fraction_of_bandwidth"] == pytest.approx(model["bound_ms"] / model["ms"])
    assert bench.model_rows(rows, "cublas", "cublas") == []


def test_format_table():
    table = bench.format_table(
        [{"m": 1, "ms": 0.012345, "name": "o"}, {"m": 16, "name": "down"}], ["m", "ms", "name"]
    )
    assert table.splitlines() == [
        "| m | ms | name |",
        "|---|---|---|",
        "| 1 | 0.0123 | o |",
        "| 16 | - | down |",
    ]


def test_tune_grid_shapes():
    one = bench.tune_grid(1)
    assert one["gemv"] and one["int4_gemv"] and not one["int4_gemm"]
    assert all(not c[3] and c[0] == 1 for c in one["gemv"])  # M=1: multiply-adds only
    three = bench.tune_grid(3)
    assert {c[0] for c in three["gemv"] if not c[3]} == {4}  # FMA rows padded to a power of 2
    assert three["int4_gemm"] and all(c[0] == 16 for c in three["int4_gemm"])
    assert all(c[3] for c in bench.tune_grid(16)["gemv"])  # tensor cores only
    big = bench.tune_grid(64)
    assert not big["gemv"] and all(c[0] >= 64 for c in big["int4_gemm"])
