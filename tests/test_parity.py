"""Greedy outputs equal transformers' token for token (float32, CPU), for every family, under
batching, small prefill chunks, prefix-cache hits and preemption; no block is leaked."""

from __future__ import annotations

import random

import pytest
from factory import FAMILIES, hf_greedy

from pdray import LLM, SamplingParams

MAX_NEW_TOKENS = 8
PROMPT_LENS = [1, 3, 17, 40, 64, 100]


def make_prompts(seed: int, vocab_size: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


def shared_prefix_prompts(seed: int, vocab_size: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(37)]
    return [prefix + [rng.randrange(3, vocab_size) for _ in range(n)] for n in (1, 5, 20, 33)]


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def new_llm(path, **kwargs) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", **kwargs)


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests and not engine.scheduler.has_work


SCENARIOS = {
    "batched": {},
    "small_chunks": {"max_num_batched_tokens": 16, "block_size": 4},
    "preemption": {"num_kv_blocks": 40, "block_size": 4, "max_model_len": 128},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(checkpoint, family, scenario):
    path = checkpoint(family)
    prompts = make_prompts(seed=hash(family) % 1000)
    expected = hf_greedy(path, prompts, MAX_NEW_TOKENS)
    llm = new_llm(path, **SCENARIOS[scenario])
    assert greedy(llm, prompts) == expected
    if scenario == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_keep_parity(checkpoint, family):
    path = checkpoint(family)
    prompts = shared_prefix_prompts(seed=7)
    expected = hf_greedy(path, prompts, MAX_NEW_TOKENS)
    llm = new_llm(path, block_size=4, max_num_batched_tokens=24)
    first = greedy(llm, prompts)
    hits_before = llm.engine.block_manager.num_prefix_hits
    second = greedy(llm, prompts)
    assert llm.engine.block_manager.num_prefix_hits > hits_before
    assert first == expected and second == expected
    assert_no_leak(llm)


def test_sharded_checkpoint_loads_identically(checkpoint):
    single = checkpoint("llama3")
    sharded = checkpoint("llama3", num_shards=3)
    prompts = make_prompts(seed=3)
    assert greedy(new_llm(single), prompts) == greedy(new_llm(sharded), prompts)
