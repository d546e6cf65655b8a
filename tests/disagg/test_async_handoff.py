"""The prefill hand-off off the engine loop's thread: while one request's flush waits for decode,
the next prompt computes; the blocks of a request are released (and its PrefillResult emitted)
only after its flush ended, also when it was aborted meanwhile."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from pdray import SamplingParams
from pdray.config import EngineConfig
from pdray.disagg.decode import DecodeWorker
from pdray.disagg.prefill import PrefillWorker
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import PrefillResult
from pdray.kv_transfer.local import LocalTransport
from pdray.outputs import RequestOutput

ENGINE = {"device": "cpu", "dtype": "float32", "block_size": 4}
GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
_ids = itertools.count()


class HeldFlush(LocalTransport):
    """A local transport whose flush waits until the test releases it."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def flush(self, peer_id: str, timeout_s: float) -> None:
        assert self.release.wait(10), "the test never released the flush"
        super().flush(peer_id, timeout_s)


@pytest.fixture
def pair(checkpoint):
    path = str(checkpoint("llama3"))
    woken = threading.Event()
    transport = HeldFlush()
    prefill = PrefillWorker(
        LLMEngine(EngineConfig(model=path, role="prefill", **ENGINE)), transport, wake=woken.set
    )
    decode = DecodeWorker(
        LLMEngine(EngineConfig(model=path, role="decode", **ENGINE)),
        LocalTransport(),
        engine_id=f"async-{next(_ids)}",
    )
    yield prefill, decode, transport, woken
    transport.release.set()
    prefill.close()
    decode.close()


def test_the_next_prompt_computes_while_a_flush_waits(pair):
    prefill, decode, transport, woken = pair
    engine = prefill.engine
    for request_id, prompt in (("a", list(range(10, 30))), ("b", list(range(40, 52)))):
        prefill.submit(request_id, prompt, GREEDY, decode.reserve(request_id, prompt, GREEDY))
        [first] = prefill.step()  # the first token; the hand-off waits on the held flush
        assert isinstance(first, RequestOutput) and first.request_id == request_id
    assert set(prefill.handing_off) == {"a", "b"} and prefill.has_work()
    assert engine.num_free_blocks < engine.block_manager.num_blocks  # held during the flush
    transport.release.set()
    results, deadline = [], time.monotonic() + 10
    while len(results) < 2:
        assert time.monotonic() < deadline, "the hand-offs did not end"
        woken.wait(1)
        woken.clear()
        results += [r for r in prefill.step() if isinstance(r, PrefillResult)]
    assert sorted((r.request_id, r.error) for r in results) == [("a", None), ("b", None)]
    assert engine.num_free_blocks == engine.block_manager.num_blocks and not engine.requests
    assert not prefill.has_work()


def test_abort_during_the_flush_releases_after_it(pair):
    prefill, decode, transport, woken = pair
    engine = prefill.engine
    prompt = list(range(10, 30))
    prefill.submit("x", prompt, GREEDY, decode.reserve("x", prompt, GREEDY))
    prefill.step()
    assert prefill.abort("x") is None
    assert engine.num_free_blocks < engine.block_manager.num_blocks  # the receiver may still read
    transport.release.set()
    assert woken.wait(10), "the ended flush did not wake the prefill worker"
    assert prefill.step() == []  # released, nothing emitted for an aborted request
    assert engine.num_free_blocks == engine.block_manager.num_blocks and not engine.requests
