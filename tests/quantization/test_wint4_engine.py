"""quantization="wint4" on full-precision checkpoints (round to nearest at load), CPU float32:
the engine equals transformers running the dequantized weights (llama and qwen2 shapes, prompt
logprobs included), tensor parallel 2 equals 1, a prefill + decode pair equals the mixed engine,
dummy weights quantize too, and what cannot be quantized is refused with a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from int4_checkpoints import write_rtn_reference
from reference_check import (
    LOGPROB_ATOL,
    SCORED_PROMPT,
    assert_matches_dequantized,
    hf_logprobs,
    int4_group_sizes,
)
from test_parity import assert_no_leak, greedy, make_prompts

from pdray import LLM, SamplingParams
from pdray.layers.linear import RowParallelLinear
from pdray.quantization.int4 import choose_group_size, quantize
from pdray.quantization.spec import Int4Source, Int4Spec
from pdray.worker.parallel import TensorParallel, bound

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kv_transfer"))
from disagg_harness import assert_baseline, make_pair, run  # noqa: E402

ENGINE = {"device": "cpu", "dtype": "float32", "quantization": "wint4"}
RTN = Int4Spec(Int4Source.RTN)


@pytest.fixture(scope="module")
def llama_wint4(checkpoint):
    path = checkpoint("llama3")
    return path, LLM(str(path), block_size=4, **ENGINE)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_wint4_equals_dequantized_reference(checkpoint, tmp_path, llama_wint4, family):
    path = checkpoint(family)
    llm = llama_wint4[1] if family == "llama3" else LLM(str(path), **ENGINE)
    assert int4_group_sizes(llm.engine) == {64, 128}  # hidden 64 -> 64, intermediate 128 -> 128
    write_rtn_reference(path, tmp_path / "ref", choose_group_size)
    assert_matches_dequantized(llm, tmp_path / "ref", full_precision=path)
    assert_no_leak(llm)


@pytest.mark.parametrize("family", ["llama3", "llama3.2"])  # LM head untied, tied
def test_quantized_lm_head_equals_dequantized_reference(checkpoint, tmp_path, family):
    """quantize_lm_head: the head's logits come from its int4 copy (the reference rounds it
    too); an untied head's full-precision weight is freed, a tied one stays the embedding's."""
    path = checkpoint(family)
    write_rtn_reference(path, tmp_path / "ref", choose_group_size, lm_head=True)
    write_rtn_reference(path, tmp_path / "ref_full_head", choose_group_size)
    with LLM(str(path), quantize_lm_head=True, **ENGINE) as llm:
        model = llm.engine.runner.model
        assert model.lm_head.int4_group_size == 64  # hidden 64
        if family == "llama3":
            assert model.lm_head.weight is None
        else:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        assert_matches_dequantized(llm, tmp_path / "ref", full_precision=path)
        assert_no_leak(llm)
    # the check tells a rounded head from a full-precision one
    gap = (hf_logprobs(tmp_path / "ref", SCORED_PROMPT)
           - hf_logprobs(tmp_path / "ref_full_head", SCORED_PROMPT)).abs().max()  # fmt: skip
    assert gap > 10 * LOGPROB_ATOL, f"rounding the LM head changed logprobs by only {gap}"


def test_quantize_lm_head_needs_an_int4_model(checkpoint):
    with pytest.raises(ValueError, match="quantize_lm_head quantizes the LM head of an int4"):
        LLM(str(checkpoint("llama3")), device="cpu", dtype="float32", quantize_lm_head=True)
    with pytest.raises(ValueError, match="`quantize_lm_head` must be true or false"):
        LLM(str(checkpoint("llama3")), quantize_lm_head="yes", **ENGINE)


def test_wint4_prefill_decode_pair_equals_mixed(llama_wint4):
    path, mixed = llama_wint4
    prompts = make_prompts(seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in mixed.generate(prompts, params, use_tqdm=False)]
    prefill, decode = make_pair(
        path, prefill_kwargs={**ENGINE, "block_size": 4}, decode_kwargs={**ENGINE, "block_size": 4}
    )
    try:
        assert int4_group_sizes(prefill.engine) == int4_group_sizes(decode.engine) == {64, 128}
        outputs, _ = run(prefill, decode, prompts, params)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert_baseline(prefill.engine, decode.engine)
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_wint4_tp2_equals_tp1(checkpoint, quantize_lm_head):
    """Per-rank input features of 128 (hidden and intermediate 256 over 2 ranks): both sizes
    quantize every layer in the same groups, so the tokens must be the same (an int4 LM head
    too: each rank rounds its vocab rows, whole rows either way)."""
    path = checkpoint("llama3", hidden_size=256, intermediate_size=256)
    prompts = make_prompts(seed=11)
    engine = {**ENGINE, "quantize_lm_head": quantize_lm_head}
    one = LLM(str(path), block_size=4, **engine)
    assert int4_group_sizes(one.engine) == {128}
    expected = greedy(one, prompts)
    with LLM(str(path), block_size=4, tensor_parallel_size=2, **engine) as two:
        assert int4_group_sizes(two.engine) == {128}
        assert greedy(two, prompts) == expected
        assert_no_leak(two)


def test_row_parallel_rank_holds_whole_groups():
    """A row-parallel layer picks its group size from the input features of its rank, and its
    int4 shard equals that rank's columns of the whole weight quantized in the same groups."""
    weight = torch.randn(16, 192, generator=torch.Generator().manual_seed(0))
    for rank in (0, 1):
        with bound(TensorParallel(rank=rank, size=2)):
            layer = RowParallelLinear(192, 16, int4=RTN)
            layer.weight_loader(layer.weight, weight)
            assert layer.quantize_weight()
        assert layer.group_size == 32  # 96 per rank; 192 alone would take 64
        whole = quantize(weight, 32, symmetric=False)
        cols = slice(rank * 48, (rank + 1) * 48)
        assert torch.equal(layer.qweight, whole.qweight[:, cols])
        groups = slice(rank * 3, (rank + 1) * 3)
        assert torch.equal(layer.scales, whole.scales[:, groups])
        assert torch.equal(layer.zeros, whole.zeros[:, groups])
    with bound(TensorParallel(rank=0, size=2)), pytest.raises(ValueError, match="holds 56"):
        RowParallelLinear(112, 16, int4=RTN)


def test_wint4_dummy_weights():
    with LLM("dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=64,
             quantization="wint4") as llm:  # fmt: skip
        assert int4_group_sizes(llm.engine) == {128}
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        int4_bytes = sum(p.nbytes for p in llm.engine.runner.model.parameters())
    with LLM("dummy:tiny", device="cpu", dtype="float32", num_kv_blocks=64) as full:
        full_bytes = sum(p.nbytes for p in full.engine.runner.model.parameters())
    linear = 4 * 256 * (256 + 2 * 64 + 256 + 2 * 768 + 768)  # dummy:tiny's linear parameters
    # int4: half a byte per weight plus a scale and a zero (4 bytes each) per 128
    assert full_bytes - int4_bytes == pytest.approx(linear * (4 - 0.5 - 8 / 128))


def test_errors_name_the_problem(checkpoint):
    with pytest.raises(ValueError, match=r"`quantization` must be one of \[None, 'wint4'\]"):
        LLM(str(checkpoint("llama3")), device="cpu", quantization="int8")
    path = checkpoint("llama3", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="multiple of 32; this one holds 48"):
        LLM(str(path), **ENGINE)
