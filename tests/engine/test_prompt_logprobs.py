"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers: per prompt position
after the first, the prompt token's log-probability given the tokens before it (log_softmax of
transformers' float32 logits at the position before), its rank, and the top-k with their ranks.

Covers k = 0 and 5, chunked prefill, prefix caching (a repeated prompt still computes everything),
n = 2, preemption, tensor parallelism over two CPU ranks, and the PD path (prefill's first-token
output carries them, decode never computes them, the router's `SentTokens` passes them once and
keeps them on later outputs). Only a request that asks runs the LM head over its prompt."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdray import LLM, SamplingParams
from pdray.disagg.client_stream import SentTokens, pd_outputs
from pdray.disagg.pair import _make_loop
from pdray.engine.loop import AsyncSink
from pdray.outputs import CompletionOutput, Logprob, RequestOutput

ENGINE = {"device": "cpu", "dtype": "float32", "block_size": 4}
PROMPTS = [[5, 9, 31, 7, 2, 88, 41, 17, 23, 6], list(range(40, 77)), [7], [300, 12]]
TOLERANCE = 1e-4
NEAR_TIE = 1e-5  # reference values this close may swap ranks under float32 rounding


@pytest.fixture(scope="module")
def path(checkpoint):
    return str(checkpoint("llama3"))


@pytest.fixture(scope="module")
def reference(path):
    """prompt -> [len(prompt), V] log_softmax of transformers' float32 logits per position."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logprobs(prompt: list[int]) -> torch.Tensor:
        key = tuple(prompt)
        if key not in cache:
            with torch.no_grad():
                logits = model(torch.tensor([prompt])).logits[0].float()
            cache[key] = torch.log_softmax(logits, dim=-1)
        return cache[key]

    return logprobs


@pytest.fixture(scope="module")
def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def llm(path):
    with LLM(path, **ENGINE) as llm:
        yield llm


def assert_rank(row: torch.Tensor, token_id: int, rank: int) -> None:
    value = row[token_id]
    if ((row - value).abs() < NEAR_TIE).sum() > 1:
        return  # ties aside
    assert rank == int((row > value).sum()) + 1


def assert_matches(got, prompt, reference, tokenizer, k: int) -> None:
    ref = reference(prompt)
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    for i in range(1, len(prompt)):
        entry, row, token = got[i], ref[i - 1], prompt[i]
        top = row.topk(k).indices.tolist() if k else []
        assert set(entry) == {token, *top}, f"position {i}"
        for token_id, lp in entry.items():
            assert lp.logprob == pytest.approx(float(row[token_id]), abs=TOLERANCE)
            assert_rank(row, token_id, lp.rank)
            assert lp.decoded_token == tokenizer.decode([token_id])
        if k:
            assert sorted(entry[t].rank for t in top) == list(range(1, k + 1)), f"position {i}"


def generate(llm: LLM, prompts, params: SamplingParams) -> list[RequestOutput]:
    return llm.generate(prompts, params, use_tqdm=False)


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 5])
def test_prompt_logprobs_match_transformers(llm, reference, tokenizer, k):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=k)
    outputs = generate(llm, PROMPTS, params)
    plain = generate(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    for prompt, out, want in zip(PROMPTS, outputs, plain, strict=True):
        assert_matches(out.prompt_logprobs, prompt, reference, tokenizer, k)
        assert out.outputs[0].token_ids == want.outputs[0].token_ids  # generation unchanged
        assert want.prompt_logprobs is None


def test_independent_of_sampling_settings(llm, reference, tokenizer):
    params = SamplingParams(
        temperature=1.7, top_k=3, top_p=0.5, repetition_penalty=1.3, seed=3, max_tokens=3,
        prompt_logprobs=2,
    )  # fmt: skip
    [out] = generate(llm, [PROMPTS[1]], params)
    assert_matches(out.prompt_logprobs, PROMPTS[1], reference, tokenizer, 2)


def test_chunked_prefill(path, reference, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    with LLM(path, max_num_batched_tokens=8, **ENGINE) as small:
        outputs = generate(small, PROMPTS, params)
        assert small.engine.num_free_blocks == small.engine.block_manager.num_blocks
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert_matches(out.prompt_logprobs, prompt, reference, tokenizer, 3)


def test_prefix_cache_hits_are_off_for_a_scored_prompt(path, reference, tokenizer):
    prompt = PROMPTS[1]
    scored = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    with LLM(path, enable_prefix_caching=True, **ENGINE) as cached:
        [warm] = generate(cached, [prompt], plain)
        [first] = generate(cached, [prompt], scored)
        [again] = generate(cached, [prompt], scored)
        [hit] = generate(cached, [prompt], plain)  # the scored requests' blocks are published
    assert first.num_cached_tokens == again.num_cached_tokens == 0
    assert hit.num_cached_tokens > 0
    for out in (first, again):
        assert_matches(out.prompt_logprobs, prompt, reference, tokenizer, 1)
        assert out.outputs[0].token_ids == warm.outputs[0].token_ids


def test_n2_scores_the_prompt_once(llm, reference, tokenizer):
    rows = spy_prompt_rows(llm)
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=3, prompt_logprobs=2)
    [out] = generate(llm, [PROMPTS[1]], params)
    assert len(out.outputs) == 2
    assert_matches(out.prompt_logprobs, PROMPTS[1], reference, tokenizer, 2)
    assert sum(len(r.target_ids) for r in rows) == len(PROMPTS[1]) - 1


def test_preempted_prompt_is_scored_again(path, reference, tokenizer):
    """A KV cache too small for both requests at once: one is preempted mid-prompt and
    recomputed; its scores are still complete and right."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    prompts = [PROMPTS[1], PROMPTS[1][::-1]]
    with LLM(path, num_kv_blocks=14, max_num_batched_tokens=8, **ENGINE) as tight:
        outputs = generate(tight, prompts, params)
        assert tight.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_matches(out.prompt_logprobs, prompt, reference, tokenizer, 2)


def spy_prompt_rows(llm: LLM) -> list:
    """Every PromptLogprobRow the engine's runner gets from now on (the spy stays: harmless)."""
    runner = llm.engine.runner
    rows: list = []
    execute_step = runner.execute_step

    def spy(batch):
        rows.extend(batch.prompt_logprob_rows)
        return execute_step(batch)

    runner.execute_step = spy
    return rows


def test_only_a_request_that_asks_pays(path):
    """The LM head runs over the sampled rows plus the prompt positions of the scoring request
    only, batched with a request that does not ask."""
    with LLM(path, **ENGINE) as fresh:
        model = fresh.engine.runner.model
        lm_head_rows: list[int] = []
        compute_logits = model.compute_logits

        def counting(hidden):
            lm_head_rows.append(hidden.shape[0])
            return compute_logits(hidden)

        model.compute_logits = counting
        engine = fresh.engine
        plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.add_request("plain", PROMPTS[0], plain)
        engine.add_request(
            "scored", PROMPTS[1], SamplingParams(**{**plain.to_dict(), "prompt_logprobs": 0})
        )
        while engine.has_unfinished_requests():
            engine.step()
    prompt_positions = len(PROMPTS[1]) - 1
    sampled = 2 * 3  # two requests, three tokens each
    assert sum(lm_head_rows) == sampled + prompt_positions


def test_mixed_k_in_one_step_over_several_lm_head_calls(path, reference, tokenizer):
    """Two scoring requests with different k in the same steps; max_num_seqs=2 limits a call of
    the LM head to 4 prompt positions, so each step's rows span several calls."""
    with LLM(path, max_num_seqs=2, **ENGINE) as few:
        engine = few.engine
        for k, prompt in zip((0, 5), PROMPTS[:2], strict=True):
            params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k)
            engine.add_request(f"k{k}", prompt, params)
        final = {}
        while engine.has_unfinished_requests():
            final.update((o.request_id, o) for o in engine.step())
    assert_matches(final["k0"].prompt_logprobs, PROMPTS[0], reference, tokenizer, 0)
    assert_matches(final["k5"].prompt_logprobs, PROMPTS[1], reference, tokenizer, 5)


def test_streaming_outputs_carry_them_once_complete(path, reference, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    with LLM(path, max_num_batched_tokens=8, **ENGINE) as small:
        engine = small.engine
        engine.add_request("r", PROMPTS[1], params)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4]
    assert all(o.prompt_logprobs is outputs[0].prompt_logprobs for o in outputs)
    assert_matches(outputs[0].prompt_logprobs, PROMPTS[1], reference, tokenizer, 1)


def test_validation():
    for bad in (-1, 21, 1.5, "3"):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=20).to_dict()["prompt_logprobs"] == 20


# -- tensor parallelism -------------------------------------------------------------------------


def test_tensor_parallel(path, reference, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=4)
    with LLM(
        path, tensor_parallel_size=2, max_num_batched_tokens=16, max_num_seqs=3, **ENGINE
    ) as tp:  # scoring steps make several LM head calls (6 positions each) on both ranks
        outputs = generate(tp, PROMPTS, params)
        # a second round: the ranks are still in step after scoring steps
        again = generate(tp, PROMPTS[:1], params)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert_matches(out.prompt_logprobs, prompt, reference, tokenizer, 4)
    assert_matches(again[0].prompt_logprobs, PROMPTS[0], reference, tokenizer, 4)


# -- prefill/decode -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loops(path):
    prefill = _make_loop("prefill", path, "local", ENGINE, "prompt-logprobs-prefill")
    decode = _make_loop("decode", path, "local", ENGINE, f"prompt-logprobs-decode-{id(path)}")
    yield prefill, decode
    decode.close()
    prefill.close()


async def pd_generate(loops, request_id, prompt, params):
    """(client outputs, every output seen by source) of one request, read as the router does."""
    prefill, decode = loops
    decode_sink, prefill_sink = AsyncSink(), AsyncSink()
    ticket = await asyncio.wrap_future(
        decode.submit(
            request_id, decode_sink, lambda: decode.worker.reserve(request_id, prompt, params)
        )
    )
    await asyncio.wrap_future(
        prefill.submit(
            request_id, prefill_sink,
            lambda: prefill.worker.submit(request_id, prompt, params, ticket),
        )
    )  # fmt: skip
    seen: list[tuple[str, RequestOutput]] = []
    outputs = pd_outputs(
        prefill.stream(request_id, prefill_sink), decode.stream(request_id, decode_sink),
        params, SentTokens(), lambda end: None, lambda source, out: seen.append(
            (source, out.prompt_logprobs)),
    )  # fmt: skip
    return [out async for out in outputs], seen


@pytest.mark.parametrize("n", [1, 2])
def test_pd_first_token_output_carries_them(loops, llm, reference, tokenizer, n):
    params = SamplingParams(
        n=n, temperature=0 if n == 1 else 1.0, seed=11, max_tokens=4, ignore_eos=True,
        prompt_logprobs=3,
    )  # fmt: skip
    for i, prompt in enumerate(PROMPTS[:2]):
        outputs, seen = asyncio.run(
            asyncio.wait_for(pd_generate(loops, f"pd-{n}-{i}", prompt, params), 60)
        )
        first, final = outputs[0], outputs[-1]
        assert final.finished
        assert all(len(c.token_ids) == 1 for c in first.outputs)  # from prefill
        assert_matches(first.prompt_logprobs, prompt, reference, tokenizer, 3)
        assert all(o.prompt_logprobs is first.prompt_logprobs for o in outputs)
        assert any(source == "prefill" and lp is not None for source, lp in seen)
        assert all(lp is None for source, lp in seen if source == "decode")
        [want] = generate(llm, [prompt], params)
        for got, expected in zip(final.outputs, want.outputs, strict=True):
            assert got.token_ids == expected.token_ids
    for loop in loops:
        engine = loop.worker.engine
        idle = loop.call(lambda engine=engine: (engine.num_free_blocks, len(engine.requests)))
        assert idle.result(timeout=10)[1] == 0


def _output(tokens: list[int], prompt_logprobs=None, finished=False) -> RequestOutput:
    choice = CompletionOutput(0, "", tokens)
    return RequestOutput("r", None, [1, 2], [choice], finished, prompt_logprobs=prompt_logprobs)


def test_sent_tokens_pass_prompt_logprobs_once():
    """Decode's first output overtaking prefill's: prefill's, with no new token but the prompt's
    logprobs, still passes, once; later outputs keep carrying them."""
    scores = [None, {2: Logprob(-1.0, 1, "b")}]
    sent = SentTokens()
    assert sent.admit(_output([9]))  # decode's admission output came first
    from_prefill = _output([9], scores)
    assert sent.admit(from_prefill)
    assert not sent.admit(_output([9], scores))  # nothing new any more
    later = _output([9, 4])
    assert sent.admit(later) and later.prompt_logprobs is scores
    final = _output([9, 4], finished=True)
    assert sent.admit(final) and final.prompt_logprobs is scores


def test_sent_tokens_never_pass_an_output_behind_for_prompt_logprobs():
    """Prefill's first-token output coming after decode sent two tokens does not pass (it would
    take a token back); the next output carries its prompt logprobs."""
    scores = [None, {2: Logprob(-1.0, 1, "b")}]
    sent = SentTokens()
    assert sent.admit(_output([9])) and sent.admit(_output([9, 4]))
    assert not sent.admit(_output([9], scores))
    final = _output([9, 4, 5], finished=True)
    assert sent.admit(final) and final.prompt_logprobs is scores
