"""AWQ and GPTQ int4 checkpoints (written by the packers in int4_checkpoints.py, from the formats'
definitions) load through pdray's loader and equal transformers running their dequantized
weights; tensor parallel 2 loads each rank's shard; unsupported checkpoints are refused."""

from __future__ import annotations

import json

import pytest
from int4_checkpoints import write_int4_checkpoints
from reference_check import assert_matches_dequantized, int4_group_sizes
from test_parity import greedy, make_prompts

from pdray import LLM

CASES = {
    "awq-llama3-g32": ("llama3", {"method": "awq", "group_size": 32}),
    "gptq-sym-qwen2-g64": ("qwen2", {"method": "gptq", "group_size": 64, "symmetric": True}),
    "gptq-v2-llama3-g32": (
        "llama3",
        {"method": "gptq", "group_size": 32, "gptq_format": "gptq_v2"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_int4_checkpoint_equals_dequantized_reference(checkpoint, tmp_path, case):
    family, kwargs = CASES[case]
    src = checkpoint(family)
    write_int4_checkpoints(src, tmp_path / "int4", tmp_path / "ref", **kwargs)
    # no `quantization` argument: the checkpoint's quantization_config decides
    llm = LLM(str(tmp_path / "int4"), device="cpu", dtype="float32")
    assert int4_group_sizes(llm.engine) == {kwargs["group_size"]}
    assert_matches_dequantized(llm, tmp_path / "ref", full_precision=src)


def test_awq_checkpoint_tp2_equals_tp1(checkpoint, tmp_path):
    src = checkpoint("llama3")
    write_int4_checkpoints(src, tmp_path / "int4", tmp_path / "ref", method="awq", group_size=32)
    engine = {"device": "cpu", "dtype": "float32", "quantization": "wint4", "block_size": 4}
    prompts = make_prompts(seed=23)
    expected = greedy(LLM(str(tmp_path / "int4"), **engine), prompts)
    with LLM(str(tmp_path / "int4"), tensor_parallel_size=2, **engine) as llm:
        assert int4_group_sizes(llm.engine) == {32}
        assert greedy(llm, prompts) == expected


def _with_quantization_config(src, dst, qcfg: dict):
    write_int4_checkpoints(src, dst, dst.parent / "ref", method="awq", group_size=32)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(qcfg)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("qcfg", "message"),
    [
        ({"bits": 8}, "AWQ quantization_config has bits=8"),
        ({"quant_method": "gptq", "desc_act": True}, "desc_act=true"),
        ({"group_size": 64}, r"\.(scales|zeros)'.*checkpoint shape"),  # the tensors say 32
    ],
)
def test_unsupported_checkpoints_are_refused(checkpoint, tmp_path, qcfg, message):
    path = _with_quantization_config(checkpoint("llama3"), tmp_path / "int4", qcfg)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), device="cpu", dtype="float32")
