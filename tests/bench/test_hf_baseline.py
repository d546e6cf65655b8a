"""The token check of the engine benchmark's transformers baseline (CPU, float32, tiny Llamas):
the baseline model built from the runner's weights and rotary generates the runner's greedy tokens,
and a baseline that computes something else is reported as such."""

from __future__ import annotations

import pytest
import torch

from pdray.bench.hf_baseline import (
    TokenCheck,
    build_hf_llama,
    compare_tokens,
    hf_greedy,
    pdray_greedy,
)
from pdray.config import EngineConfig
from pdray.worker.model_runner import ModelRunner

NEW_TOKENS = 8


def _runner(path) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=4))


def _prompt(runner: ModelRunner, length: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(length)
    return torch.randint(3, runner.arch.vocab_size, (1, length), generator=gen)


# default rotary (theta 500000), llama3 rope scaling, tied embeddings, theta 10000 with MHA
@pytest.mark.parametrize("family", ["llama3", "llama3.1", "llama3.2", "llama2"])
def test_baseline_generates_the_runner_tokens(checkpoint, family):
    runner = _runner(checkpoint(family))
    ids = _prompt(runner)
    with torch.no_grad():
        hf_tokens, hf_logits = hf_greedy(build_hf_llama(runner), ids, NEW_TOKENS)
    assert hf_logits.shape == (NEW_TOKENS, runner.arch.vocab_size)
    tokens = pdray_greedy(runner, ids[0].tolist(), NEW_TOKENS)
    check = compare_tokens(hf_tokens, hf_logits, tokens)
    assert check == TokenCheck(same_tokens=True, num_tokens=NEW_TOKENS), check.describe()
    assert check.as_dict()["same_tokens"] is True


def test_a_baseline_with_other_weights_is_reported(checkpoint):
    runner = _runner(checkpoint("llama3"))
    ids = _prompt(runner)
    hf = build_hf_llama(runner)
    with torch.no_grad():
        for layer in hf.model.layers:  # o_proj transposed: same sizes, another model
            layer.self_attn.o_proj.weight.copy_(layer.self_attn.o_proj.weight.T.clone())
        hf_tokens, hf_logits = hf_greedy(hf, ids, NEW_TOKENS)
    check = compare_tokens(hf_tokens, hf_logits, pdray_greedy(runner, ids[0].tolist(), NEW_TOKENS))
    assert not check.same_tokens and check.first_mismatch is not None
    assert check.hf_gap_to_pdray_token > 0 and check.hf_top2_gap >= 0
    assert "differ from new token" in check.describe()


def test_compare_tokens_reports_the_first_difference_and_the_logit_gaps():
    logits = torch.zeros(3, 5)
    logits[1] = torch.tensor([0.0, 2.0, 1.5, 0.5, 0.0])
    check = compare_tokens([4, 1, 0], logits, [4, 3, 2])
    assert (check.same_tokens, check.first_mismatch) == (False, 1)
    assert check.hf_top2_gap == pytest.approx(0.5)
    assert check.hf_gap_to_pdray_token == pytest.approx(1.5)
    short = compare_tokens([4, 1, 0], logits, [4, 1])
    assert (short.same_tokens, short.first_mismatch, short.hf_top2_gap) == (False, 2, None)


def test_the_timed_baseline_returns_its_token_check(checkpoint, monkeypatch):
    """hf_decode_ms_per_token as the benchmark calls it, with the GPU timer replaced by one call."""
    from pdray.bench import hf_baseline

    monkeypatch.setattr(hf_baseline, "wall_median_ms", lambda fn, iters, warmup: fn() or 1.0)
    runner = _runner(checkpoint("llama3.1"))
    ms, check = hf_baseline.hf_decode_ms_per_token(runner, context_len=24, new_tokens=4)
    assert ms == 0.0
    assert check == TokenCheck(same_tokens=True, num_tokens=4)
