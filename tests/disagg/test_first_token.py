"""First token from prefill: a real prefill engine and a real decode engine (local transport), each
on its EngineLoop, read through `pd_outputs` exactly as the router reads its Serve replicas. The
client's outputs equal the mixed engine's (greedy, seeded sampling, n > 1, a stop string across
the first and second tokens, logprobs), the first one comes from prefill, and no output repeats
a token; a hand-off that fails after the first token was sent ends in decode's recompute, still
without a repeat. Every block comes back."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from pdray import LLM, SamplingParams
from pdray.disagg.client_stream import SentTokens, pd_outputs
from pdray.disagg.pair import _make_loop
from pdray.engine.loop import AsyncSink
from pdray.kv_transfer.base import TransferError

ENGINE = {"device": "cpu", "dtype": "float32", "block_size": 4}
PROMPTS = [[5, 9, 31, 7, 2, 88, 41, 17, 23, 6], list(range(40, 77))]


@pytest.fixture(scope="module")
def path(checkpoint):
    return str(checkpoint("llama3"))


@pytest.fixture(scope="module")
def mixed(path):
    return LLM(path, **ENGINE)


@pytest.fixture(scope="module")
def loops(path):
    prefill = _make_loop("prefill", path, "local", ENGINE, "first-token-prefill")
    decode = _make_loop("decode", path, "local", ENGINE, f"first-token-decode-{id(path)}")
    yield prefill, decode
    decode.close()
    prefill.close()


async def pd_generate(loops, request_id, prompt, params, ends=None):
    """The client's outputs of one request, as the router produces them."""
    prefill, decode = loops
    decode_sink, prefill_sink = AsyncSink(), AsyncSink()
    ticket = await asyncio.wrap_future(
        decode.submit(
            request_id, decode_sink, lambda: decode.worker.reserve(request_id, prompt, params)
        )
    )
    assert ticket is not None
    await asyncio.wrap_future(
        prefill.submit(
            request_id,
            prefill_sink,
            lambda: prefill.worker.submit(request_id, prompt, params, ticket),
        )
    )
    ends = [] if ends is None else ends
    outputs = pd_outputs(
        prefill.stream(request_id, prefill_sink),
        decode.stream(request_id, decode_sink),
        params,
        SentTokens(),
        ends.append,
    )
    return [out async for out in outputs]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def assert_no_repeats(outputs) -> None:
    """Each output adds a token to some choice, or is the final one."""
    for before, after in zip(outputs, outputs[1:], strict=False):
        grew = any(
            len(a.token_ids) > len(b.token_ids)
            for a, b in zip(after.outputs, before.outputs, strict=True)
        )
        assert grew or after.finished, "an output repeated the tokens already sent"
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])


def assert_equal_outputs(got, want) -> None:
    assert len(got.outputs) == len(want.outputs)
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert g.token_ids == w.token_ids
        assert g.text == w.text
        assert g.finish_reason == w.finish_reason
        if w.logprobs is not None:
            assert [list(e) for e in g.logprobs] == [list(e) for e in w.logprobs]
            for ge, we in zip(g.logprobs, w.logprobs, strict=True):
                for token_id, lp in we.items():
                    assert ge[token_id].logprob == pytest.approx(lp.logprob, abs=1e-4)
                    assert ge[token_id].rank == lp.rank


def assert_baseline(loops, timeout_s: float = 10.0) -> None:
    """Every block free and no request left, once the hand-offs in flight (on prefill's hand-off
    thread) have ended."""
    for loop in loops:
        engine = loop.worker.engine

        def idle(engine=engine):
            return engine.num_free_blocks, engine.block_manager.num_blocks, len(engine.requests)

        deadline = time.monotonic() + timeout_s
        while (state := loop.call(idle).result(timeout=10)) != (state[1], state[1], 0):
            assert time.monotonic() < deadline, f"(free, total, live) = {state} after {timeout_s} s"
            time.sleep(0.01)


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=6, ignore_eos=True),
    "n2-seeded": SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, logprobs=3, max_tokens=4, ignore_eos=True),
    "one-token": SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pd_stream_equals_mixed(loops, mixed, case):
    params = CASES[case]
    want = mixed.generate(PROMPTS, params, use_tqdm=False)
    for i, (prompt, expected) in enumerate(zip(PROMPTS, want, strict=True)):
        outputs = run(pd_generate(loops, f"{case}-{i}", prompt, params))
        assert_no_repeats(outputs)
        assert_equal_outputs(outputs[-1], expected)
    assert_baseline(loops)


def test_stop_string_across_the_first_and_second_tokens(loops, mixed):
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompt = PROMPTS[0]
    [one] = mixed.generate([prompt], replace(greedy, max_tokens=1), use_tqdm=False)
    [two] = mixed.generate([prompt], greedy, use_tqdm=False)
    first_text, both_text = one.outputs[0].text, two.outputs[0].text
    stop = both_text[len(first_text) - 1 : len(first_text) + 1]
    assert len(stop) == 2 and stop not in first_text, (first_text, both_text)
    params = replace(greedy, max_tokens=6, stop=[stop])
    [want] = mixed.generate([prompt], params, use_tqdm=False)
    assert want.outputs[0].finish_reason == "stop" and len(want.outputs[0].token_ids) == 2
    outputs = run(pd_generate(loops, "stop-span", prompt, params))
    assert_no_repeats(outputs)
    assert_equal_outputs(outputs[-1], want)
    assert_baseline(loops)


def test_the_first_token_arrives_before_decode_has_admitted(loops, mixed):
    """Decode's loop is held busy: the client still gets the first token, from prefill."""
    prefill, decode = loops
    params = CASES["greedy"]

    # The reserve itself needs decode's loop, so reserve first, then hold decode.
    async def with_reservation():
        decode_sink, prefill_sink = AsyncSink(), AsyncSink()
        ticket = await asyncio.wrap_future(
            decode.submit(
                "early", decode_sink, lambda: decode.worker.reserve("early", PROMPTS[0], params)
            )
        )
        held = threading.Event()
        decode.call(held.wait)
        try:
            await asyncio.wrap_future(
                prefill.submit(
                    "early",
                    prefill_sink,
                    lambda: prefill.worker.submit("early", PROMPTS[0], params, ticket),
                )
            )
            stream = pd_outputs(
                prefill.stream("early", prefill_sink),
                decode.stream("early", decode_sink),
                params,
                SentTokens(),
                lambda end: None,
            )
            first = await asyncio.wait_for(anext(stream), 30)
        finally:
            held.set()
        rest = [out async for out in stream]
        return [first, *rest]

    outputs = run(with_reservation())
    [want] = mixed.generate([PROMPTS[0]], params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == want.outputs[0].token_ids[:1]
    assert_no_repeats(outputs)
    assert_equal_outputs(outputs[-1], want)
    assert_baseline(loops)


@pytest.mark.parametrize("case", ["greedy", "seeded"])
def test_hand_off_failing_after_the_first_token_recomputes_without_a_repeat(
    loops, mixed, monkeypatch, case
):
    prefill, _ = loops
    params = CASES[case]

    def broken(ticket, request_id):
        raise TransferError("injected: the hand-off broke after the first token")

    monkeypatch.setattr(prefill.worker, "_hand_off_all_ranks", broken)
    ends = []
    outputs = run(pd_generate(loops, f"broken-{case}", PROMPTS[1], params, ends))
    [want] = mixed.generate([PROMPTS[1]], params, use_tqdm=False)
    assert [e.error for e in ends] == [
        "KV transfer failed: injected: the hand-off broke after the first token"
    ]
    assert_no_repeats(outputs)
    assert_equal_outputs(outputs[-1], want)  # decode recomputed the prompt (policy recompute)
    assert decode_metrics(loops).failures >= 1
    assert_baseline(loops)


def decode_metrics(loops):
    return loops[1].worker.receiver.metrics
