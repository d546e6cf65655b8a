"""Greedy outputs equal transformers' token for token (float32, CPU), for every family and for the
variants README claims (Mistral's and Qwen's sliding windows, linear rope, legacy rope spellings,
ERNIE biases), under batching, small prefill chunks, prefix-cache hits and preemption; no block is
leaked.

Prompts are seeded by a stable hash of the case's name, and a mismatch says how to replay it."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from factory import FAMILIES, VARIANTS, hf_greedy, make_checkpoint

from pdray import LLM, SamplingParams

MAX_NEW_TOKENS = 8
PROMPT_LENS = [1, 3, 17, 40, 64, 100]


def prompt_seed(name: str) -> int:
    """The same in every process (str hashes are randomised per process)."""
    return zlib.crc32(name.encode())


def make_prompts(seed: int, vocab_size: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


def shared_prefix_prompts(seed: int, vocab_size: int = 384) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(37)]
    return [prefix + [rng.randrange(3, vocab_size) for _ in range(n)] for n in (1, 5, 20, 33)]


@dataclass
class Case:
    """One parity case: everything needed to build it again by hand."""

    family: str
    prompt_seed: int
    prompts: list[list[int]]
    checkpoint_kwargs: dict[str, Any] = field(default_factory=dict)
    llm_kwargs: dict[str, Any] = field(default_factory=dict)

    def replay(self, expected: list[list[int]], got: list[list[int]]) -> str:
        ckpt = {"seed": 0, **self.checkpoint_kwargs}
        bad = [i for i, (e, g) in enumerate(zip(expected, got, strict=False)) if e != g]
        return (
            f"greedy tokens differ from transformers' for prompts {bad}; replay with "
            f"path = make_checkpoint({self.family!r}, tmp, **{ckpt!r}), "
            f"LLM(str(path), device='cpu', dtype='float32', **{self.llm_kwargs!r}), "
            f"SamplingParams(temperature=0.0, max_tokens={MAX_NEW_TOKENS}, ignore_eos=True); "
            f"prompt seed {self.prompt_seed}, prompts {self.prompts}"
        )


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


# every family under every scenario; each variant where it can differ (the sliding window also
# under chunked prefill, recomputation after preemption and prefix-cache hits)
CASES = [(name, scenario) for name in FAMILIES for scenario in sorted(SCENARIOS)] + [
    (name, scenario)
    for name in VARIANTS
    for scenario in (sorted(SCENARIOS) if name == "mistral-sliding16" else ["batched"])
]
PREFIX_CACHE_CASES = [*FAMILIES, "mistral-sliding16"]


@pytest.fixture(scope="module")
def build(checkpoint, tmp_path_factory):
    """build(name) -> (path, family, make_checkpoint overrides) for a family or a factory variant."""
    variants: dict[str, Path] = {}

    def get(name: str) -> tuple[Path, str, dict[str, Any]]:
        if name in FAMILIES:
            return checkpoint(name), name, {}
        family, overrides = VARIANTS[name]
        if name not in variants:
            path = tmp_path_factory.mktemp(name.replace(".", "_"))
            variants[name] = make_checkpoint(family, path, **overrides)
        return variants[name], family, overrides

    return get


def check_parity(llm: LLM, case: Case, expected: list[list[int]]) -> None:
    got = greedy(llm, case.prompts)
    assert got == expected, case.replay(expected, got)


@pytest.mark.parametrize(("name", "scenario"), CASES)
def test_greedy_matches_transformers(build, name, scenario):
    path, family, overrides = build(name)
    seed = prompt_seed(name)
    case = Case(family, seed, make_prompts(seed), overrides, SCENARIOS[scenario])
    expected = hf_greedy(path, case.prompts, MAX_NEW_TOKENS)
    llm = new_llm(path, **case.llm_kwargs)
    check_parity(llm, case, expected)
    if scenario == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("name", PREFIX_CACHE_CASES)
def test_prefix_cache_hits_keep_parity(build, name):
    path, family, overrides = build(name)
    seed = prompt_seed(name)
    llm_kwargs = {"block_size": 4, "max_num_batched_tokens": 24}
    case = Case(family, seed, shared_prefix_prompts(seed), overrides, llm_kwargs)
    expected = hf_greedy(path, case.prompts, MAX_NEW_TOKENS)
    llm = new_llm(path, **llm_kwargs)
    check_parity(llm, case, expected)
    hits_before = llm.engine.block_manager.num_prefix_hits
    check_parity(llm, case, expected)
    assert llm.engine.block_manager.num_prefix_hits > hits_before
    assert_no_leak(llm)


def test_sharded_checkpoint_loads_identically(checkpoint):
    single = checkpoint("llama3")
    sharded = checkpoint("llama3", num_shards=3)
    seed = prompt_seed("llama3-sharded")
    prompts = make_prompts(seed)
    assert greedy(new_llm(single), prompts) == greedy(new_llm(sharded), prompts), (
        f"llama3 in 1 and 3 shards (make_checkpoint seed 0) differ; prompt seed {seed}, "
        f"prompts {prompts}"
    )
