"""A wint4 engine against transformers running the dequantized weights (plain torch, float32):
greedy tokens equal, and teacher-forced prompt logprobs close."""

from __future__ import annotations

from pathlib import Path

import torch
from factory import hf_greedy
from test_parity import greedy, make_prompts
from transformers import AutoModelForCausalLM

from pdray import LLM, SamplingParams
from pdray.engine.llm_engine import LLMEngine
from pdray.layers.linear import LinearBase

LOGPROB_ATOL = 2e-3  # float32, two implementations; quantization moves logprobs by ~0.1
SCORED_PROMPT = list(range(7, 47))


def int4_group_sizes(engine: LLMEngine) -> set[int]:
    """The group sizes of the engine's linear layers (rank 0); fails if any is full precision
    (e.g. `quantization` did not reach the model loader)."""
    layers = [m for m in engine.runner.model.modules() if isinstance(m, LinearBase)]
    full = [type(m).__name__ for m in layers if m.qweight is None]
    assert not full, f"linear layers left in full precision: {full}"
    return {m.group_size for m in layers}


def hf_logprobs(path: Path, tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row i scores tokens[i + 1]; [len - 1, V]."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def engine_logprobs(llm: LLM, tokens: list[int]) -> tuple[list[float], list[int]]:
    """The engine's prompt logprob of tokens[1:] and its top-1 at each of those positions."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    entries = llm.generate([tokens], params, use_tqdm=False)[0].prompt_logprobs[1:]
    logprobs = [e[t].logprob for e, t in zip(entries, tokens[1:], strict=True)]
    top1 = [next(t for t, lp in e.items() if lp.rank == 1) for e in entries]
    return logprobs, top1


def assert_matches_dequantized(llm: LLM, reference: Path, full_precision: Path | None = None):
    """Greedy tokens equal transformers' on `reference` (the dequantized weights), for several
    prompts; prompt logprobs within LOGPROB_ATOL and the same top-1. With `full_precision`, also
    that the unquantized model scores differently (so the check can tell the two apart)."""
    prompts = make_prompts(seed=17)
    assert greedy(llm, prompts) == hf_greedy(reference, prompts, 8)
    expected = hf_logprobs(reference, SCORED_PROMPT)
    logprobs, top1 = engine_logprobs(llm, SCORED_PROMPT)
    ours = torch.tensor(logprobs)
    theirs = expected[torch.arange(len(logprobs)), torch.tensor(SCORED_PROMPT[1:])]
    assert torch.allclose(ours, theirs, atol=LOGPROB_ATOL), (ours - theirs).abs().max()
    assert top1 == expected.argmax(-1).tolist()
    if full_precision is not None:
        unquantized = hf_logprobs(full_precision, SCORED_PROMPT)
        gap = (unquantized - expected).abs().max()
        assert gap > 10 * LOGPROB_ATOL, f"quantization changed logprobs by only {gap}"
