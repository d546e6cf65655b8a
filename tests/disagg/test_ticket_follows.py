"""A prefill that starts before decode's ticket exists (`ticket_follows`): the ticket attached
mid-prefill, after the first token (the request is parked with its blocks held), before the
submit itself, or never (released after ticket_wait_s). Real engines over the local transport;
the decode output equals the mixed engine's and every block comes back."""

from __future__ import annotations

import itertools
import time

import pytest

from pdray import LLM, SamplingParams
from pdray.config import EngineConfig
from pdray.disagg.decode import DecodeWorker
from pdray.disagg.prefill import PrefillWorker
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import PrefillResult
from pdray.kv_transfer.local import LocalTransport
from pdray.outputs import RequestOutput

ENGINE = {"device": "cpu", "dtype": "float32", "block_size": 4}
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
PROMPT = list(range(30, 71))  # 41 tokens: 11 blocks of 4
_ids = itertools.count()


@pytest.fixture(scope="module")
def path(checkpoint):
    return str(checkpoint("llama3"))


@pytest.fixture(scope="module")
def want(path):
    [out] = LLM(path, **ENGINE).generate([PROMPT], GREEDY, use_tqdm=False)
    return out.outputs[0].token_ids


def make_pair(path, ticket_wait_s=30.0, **prefill_engine):
    engine = LLMEngine(EngineConfig(model=path, role="prefill", **ENGINE, **prefill_engine))
    prefill = PrefillWorker(engine, LocalTransport(), ticket_wait_s=ticket_wait_s)
    decode_engine = LLMEngine(EngineConfig(model=path, role="decode", **ENGINE))
    decode = DecodeWorker(decode_engine, LocalTransport(), engine_id=f"follow-{next(_ids)}")
    return prefill, decode


def finish(prefill, decode, request_id, timeout_s=30.0):
    """Step both until decode finished the request; returns (prefill items, final output)."""
    items, deadline = [], time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "not finished in time"
        items += prefill.step()
        for out in decode.step():
            if isinstance(out, RequestOutput) and out.finished:
                return items, out


def assert_idle(*workers) -> None:
    for worker in workers:
        engine = worker.engine
        assert engine.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.requests
    assert not workers[0].parked and not workers[0].awaiting and not workers[0].tickets


def test_ticket_attached_between_prefill_chunks(path, want):
    prefill, decode = make_pair(path, max_num_batched_tokens=8)
    prefill.submit("mid", PROMPT, GREEDY, None, ticket_follows=True)
    assert prefill.step() == []  # the first 8 prompt tokens computed, nothing sent yet
    ticket = decode.reserve("mid", PROMPT, GREEDY)
    assert prefill.attach("mid", ticket)
    items, final = finish(prefill, decode, "mid")
    assert final.outputs[0].token_ids == want
    [result] = [i for i in items if isinstance(i, PrefillResult)]
    assert result.error is None
    assert_idle(prefill, decode)


def test_ticket_after_the_first_token_sends_the_held_blocks(path, want):
    prefill, decode = make_pair(path)
    prefill.submit("late", PROMPT, GREEDY, None, ticket_follows=True)
    [first] = prefill.step()  # the first token, no hand-off: parked
    assert first.outputs[0].token_ids == want[:1] and not first.finished
    engine = prefill.engine
    assert "late" in prefill.parked
    assert engine.num_free_blocks <= engine.block_manager.num_blocks - 11  # held
    assert not prefill.has_runnable_work()  # parked: the loop sleeps until the ticket
    ticket = decode.reserve("late", PROMPT, GREEDY)
    assert prefill.attach("late", ticket)
    assert prefill.has_runnable_work()
    items, final = finish(prefill, decode, "late")
    assert [type(i) for i in items] == [PrefillResult] and items[0].error is None
    assert final.outputs[0].token_ids == want
    assert_idle(prefill, decode)


def test_ticket_that_overtakes_the_submit(path, want):
    prefill, decode = make_pair(path)
    ticket = decode.reserve("early", PROMPT, GREEDY)
    assert prefill.attach("early", ticket)  # kept until the submit arrives
    prefill.submit("early", PROMPT, GREEDY, None, ticket_follows=True)
    items, final = finish(prefill, decode, "early")
    assert final.outputs[0].token_ids == want
    assert [i.error for i in items if isinstance(i, PrefillResult)] == [None]
    assert_idle(prefill, decode)


def test_a_ticket_that_never_comes_releases_the_blocks(path):
    prefill, decode = make_pair(path, ticket_wait_s=0.2)
    prefill.submit("lost", PROMPT, GREEDY, None, ticket_follows=True)
    prefill.step()
    assert "lost" in prefill.parked
    deadline = prefill.next_deadline_s()
    assert deadline is not None and deadline <= time.monotonic() + 0.2
    time.sleep(0.25)
    [result] = prefill.step()
    assert isinstance(result, PrefillResult) and "no decode ticket came" in result.error
    assert prefill.attach("lost", decode.reserve("lost", PROMPT, GREEDY)) is True  # kept as early
    decode.abort("lost")
    prefill._early.clear()
    assert_idle(prefill, decode)


def test_abort_of_a_parked_request_frees_it(path):
    prefill, decode = make_pair(path)
    prefill.submit("gone", PROMPT, GREEDY, None, ticket_follows=True)
    prefill.step()
    prefill.abort("gone")
    assert_idle(prefill, decode)


def test_an_abort_that_overtakes_the_submit_refuses_it(path):
    prefill, decode = make_pair(path)
    prefill.abort("raced")  # the router gave up on the attempt before the submit arrived
    with pytest.raises(RuntimeError, match="aborted before it arrived"):
        prefill.submit("raced", PROMPT, GREEDY, None, ticket_follows=True)
    assert_idle(prefill, decode)
    prefill.submit("raced", PROMPT, GREEDY, None, ticket_follows=True)  # only refused once
    prefill.abort("raced")
    assert_idle(prefill, decode)
