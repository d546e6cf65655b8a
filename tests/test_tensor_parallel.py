"""Tensor parallelism on CPU (gloo): greedy outputs with TP=2 equal TP=1, including a model with
fewer KV heads than ranks (its KV heads are replicated); no block is leaked."""

from __future__ import annotations

import pytest
from test_parity import assert_no_leak, greedy, make_prompts, new_llm

CASES = {
    "llama3": {},
    "qwen2": {},  # QKV bias
    "qwen3": {},  # per-head q/k norms
    "llama3-one-kv-head": {"num_key_value_heads": 1},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_equals_tp1(checkpoint, case):
    family = case.split("-")[0]
    path = checkpoint(family, **CASES[case])
    prompts = make_prompts(seed=7)
    expected = greedy(new_llm(path), prompts)
    with new_llm(path, tensor_parallel_size=2, max_num_batched_tokens=64, block_size=4) as llm:
        assert greedy(llm, prompts) == expected
        assert_no_leak(llm)


def test_tp_size_must_divide_heads(checkpoint):
    path = checkpoint("llama3")  # 4 attention heads
    with pytest.raises(Exception, match="attention heads"):
        new_llm(path, tensor_parallel_size=3)
