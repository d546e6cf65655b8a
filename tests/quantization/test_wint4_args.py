"""`quantization` reaches the engine from every entry point: the Serve app's args per role (as a
key of the role or in its engine_args, validated at start), and the engine and quality
benchmarks' `--quantization`."""

from __future__ import annotations

import pytest
from pdray.deployments.app import parse_args

from pdray.bench import engine as bench_engine
from pdray.bench import quality
from pdray.config import EngineConfig, Quantization, Role


def test_each_role_sets_its_own_quantization():
    args = parse_args({
        "model": "dummy:tiny",
        "prefill": {"quantization": "wint4"},
        "decode": {"engine_args": {"quantization": "wint4"}},
        "mixed": {"replicas": 1},
    })  # fmt: skip
    configs = {
        role: EngineConfig(model=args.model, role=role, **getattr(args, role.value).engine_kwargs())
        for role in Role
    }
    assert configs[Role.PREFILL].quantization is Quantization.WINT4
    assert configs[Role.DECODE].quantization is Quantization.WINT4
    assert configs[Role.MIXED].quantization is None


@pytest.mark.parametrize(
    ("role_args", "message"),
    [
        ({"quantization": "int4"}, "prefill.quantization"),
        ({"engine_args": {"quantization": "int4"}}, r"`quantization` must be one of"),
        ({"quantization": "wint4", "engine_args": {"quantization": "wint4"}}, "set twice"),
    ],
)
def test_bad_quantization_fails_at_start(role_args, message):
    with pytest.raises(ValueError, match=message):
        parse_args({"model": "dummy:tiny", "prefill": role_args})


def test_benchmarks_take_quantization():
    assert bench_engine.parse_args(["--quantization", "wint4"]).quantization == "wint4"
    assert bench_engine.parse_args([]).quantization is None
    assert not bench_engine.parse_args([]).quantize_lm_head
    assert bench_engine.parse_args(
        ["--quantization", "wint4", "--quantize-lm-head"]
    ).quantize_lm_head
    with pytest.raises(SystemExit):
        bench_engine.parse_args(["--quantization", "int3"])
    args = quality.parse_args(["--model", "dummy:tiny", "--quantization", "wint4"])
    assert args.schemes == [quality.Scheme.ASYMMETRIC, quality.Scheme.SYMMETRIC,
                            quality.Scheme.ASYMMETRIC_LM_HEAD]  # fmt: skip
    assert args.num_kv_blocks > 0
    assert quality.parse_args(["--schemes", "symmetric"]).schemes == [quality.Scheme.SYMMETRIC]
