"""Real process deaths during the KV hand-off: a prefill or decode process is SIGKILLed while a
request's KV is in flight over UCX (TCP on loopback, on CPU). The surviving engine runs in this
process, so its free-block counts and transfer state are checked directly; the doomed engine runs
in a spawned child that only steps when told to, so the kill lands at a known point of the
transfer (after the first prefill step of eight, once decode holds some of its KV). The last test
(a decode engine back under the same id at a new address is reconnected) needs no child."""

from __future__ import annotations

import random
import re
import threading
import time

import pytest

try:
    from pdray.kv_transfer.ucx import UcxTransport
except ImportError as e:
    print(f"skipping process fault tests: ucxx cannot be imported ({e})")
    pytest.skip(f"ucxx cannot be imported: {e}", allow_module_level=True)

from disagg_harness import WorkerProcess, make_engine  # noqa: E402

from pdray import LLM, SamplingParams  # noqa: E402
from pdray.disagg.decode import DecodeWorker  # noqa: E402
from pdray.disagg.prefill import PrefillWorker  # noqa: E402
from pdray.engine.role_worker import (  # noqa: E402
    FailureKind,
    PrefillResult,
    RequestFailed,
    ends_stream,
)
from pdray.kv_transfer.base import FailurePolicy, LayerChunk  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = {"block_size": 4, "num_kv_blocks": 128}
PREFILL = ENGINE | {"max_num_batched_tokens": 8}  # PROMPT takes 8 prefill steps
PROMPT = [random.Random(7).randrange(3, 384) for _ in range(60)]
WARM_UP = [random.Random(8).randrange(3, 384) for _ in range(10)]  # shares no block with PROMPT
LEASE_S = 4.0
FLUSH_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama3")


@pytest.fixture(scope="module")
def want(path) -> list[int]:
    """The mixed engine's greedy output for PROMPT."""
    mixed = LLM(str(path), device="cpu", dtype="float32", **ENGINE)
    return mixed.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


class WatchedUcx(UcxTransport):
    """Sets `chunk_delivered` once a LayerChunk has been through the receiver's on_message."""

    def listen(self, engine_id, kv_cache, on_message, layout=None):
        self.chunk_delivered = threading.Event()

        def watched(message, payload):
            on_message(message, payload)
            if isinstance(message, LayerChunk):
                self.chunk_delivered.set()

        return super().listen(engine_id, kv_cache, watched, layout)


def _until(done, timeout_s: float, step, failure: str) -> None:
    """Call step() until done() holds; AssertionError "{failure} within {timeout_s} s" after
    timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{failure} within {timeout_s} s"
        step()


def _run_to_end(request_id, prompt, reserve, submit, step_prefill, step_decode):
    """One complete hand-off; returns the decode engine's final output."""
    submit(request_id, prompt, GREEDY, reserve(request_id, prompt, GREEDY))
    outputs, results = [], []

    def step_both():
        results.extend(r for r in step_prefill() if isinstance(r, PrefillResult))
        outputs.extend(step_decode())

    def done():
        return any(r.error for r in results) or any(ends_stream(o) for o in outputs)

    _until(done, 30, step_both, f"the hand-off of {request_id} did not end")
    assert [(r.request_id, r.error) for r in results] == [(request_id, None)]
    [final] = [o for o in outputs if o.finished]
    assert final.request_id == request_id
    return final


@pytest.mark.parametrize("policy", [FailurePolicy.RECOMPUTE, FailurePolicy.FAIL])
def test_prefill_killed_mid_transfer(path, want, policy):
    """Decode (here) holds a lease on blocks, part of the KV has landed, then the prefill process
    dies: the lease runs out, the blocks come back, and the policy decides how the request ends."""
    prefill = WorkerProcess("prefill", path, PREFILL).start()
    decode = None
    try:
        decode = DecodeWorker(
            make_engine(path, "decode", **ENGINE),
            WatchedUcx(host="127.0.0.1"),
            engine_id=f"decode-{policy.value}",
            policy=policy,
        )
        engine, receiver = decode.engine, decode.receiver
        baseline = engine.num_free_blocks
        assert baseline == engine.block_manager.num_blocks
        prefill.wait_ready()

        # A complete hand-off first (connects and warms both engines), so that the short lease
        # below only has to cover one prefill step.
        _run_to_end(
            "warm-up",
            WARM_UP,
            decode.reserve,
            lambda *a: prefill.call("submit", *a),
            lambda: prefill.call("step"),
            decode.step,
        )
        assert engine.num_free_blocks == baseline and receiver.metrics.completed == 1

        ticket = decode.reserve("p", PROMPT, GREEDY, lease_s=LEASE_S)
        prefill.call("submit", "p", PROMPT, GREEDY, ticket)
        assert prefill.call("step") == []  # 8 of 60 prompt tokens: their KV is on its way
        assert decode.transport.chunk_delivered.wait(10), "no KV reached the decode engine"
        prefill.kill()

        # Mid-transfer: the blocks are reserved, some KV was applied, no hand-off came.
        assert receiver.metrics.dropped_messages == 0, "the lease ran out before any KV arrived"
        assert receiver.num_live == 1 and "p" in decode.pending
        assert engine.num_free_blocks == baseline - len(ticket.seqs[0].block_table)

        outputs = []

        def step_decode():
            outputs.extend(decode.step())
            time.sleep(0.002)  # poll interval: nothing to compute while the lease runs

        # The point of the test is this deadline: the lease bounds the failover (not a transport
        # timeout); the 5 s beyond LEASE_S are slack for a loaded host.
        _until(
            lambda: "p" not in decode.pending,
            LEASE_S + 5,
            step_decode,
            "decode did not fail the request over when its lease ran out",
        )
        _until(lambda: not decode.has_work(), 20, step_decode, "decode did not finish 'p'")

        m = receiver.metrics
        assert m.completed == 1 and m.expired_leases + m.failures == 1, m
        failed = [item for item in outputs if isinstance(item, RequestFailed)]
        if policy is FailurePolicy.RECOMPUTE:
            assert failed == []
            [final] = [o for o in outputs if o.finished]
            assert final.request_id == "p"
            assert final.outputs[0].token_ids == want  # prefilled again on decode
        else:
            [event] = outputs
            assert isinstance(event, RequestFailed) and event.request_id == "p"
            assert event.error.kind is FailureKind.FAILED
            assert re.search(r"lease expired|connection", event.error.reason), event.error.reason
        assert receiver.num_live == 0 and not decode.pending
        assert engine.num_free_blocks == baseline
        assert not engine.requests
    finally:
        prefill.close()
        if decode is not None:
            decode.close()


def test_decode_killed_mid_transfer(path, want):
    """Prefill (here) is streaming a prompt's KV when the decode process dies: the hand-off fails
    with a clear error within the flush timeout, prefill frees the blocks, and the next request
    goes through to a fresh decode process (started early, only to save time)."""
    doomed = WorkerProcess("decode", path, ENGINE, {"engine_id": "decode-doomed"}).start()
    fresh = WorkerProcess("decode", path, ENGINE, {"engine_id": "decode-fresh"}).start()
    prefill = None
    try:
        prefill = PrefillWorker(
            make_engine(path, "prefill", **PREFILL),
            UcxTransport(host="127.0.0.1"),
            flush_timeout_s=FLUSH_TIMEOUT_S,
        )
        engine = prefill.engine
        baseline = engine.num_free_blocks
        assert baseline == engine.block_manager.num_blocks
        doomed.wait_ready()
        fresh.wait_ready()

        ticket = doomed.call("reserve", "d", PROMPT, GREEDY)
        prefill.submit("d", PROMPT, GREEDY, ticket)
        assert prefill.step() == []  # 8 of 60 prompt tokens: no first token yet
        prefill.transport.flush("decode-doomed", 10)  # their KV reached the decode engine
        assert engine.num_free_blocks < baseline
        num_free, num_blocks, _ = doomed.call("blocks")
        assert num_free == num_blocks - len(ticket.seqs[0].block_table)  # decode holds the lease
        doomed.kill()

        results = []
        # The point of the test is this deadline: the flush timeout bounds the failure; the 5 s
        # beyond FLUSH_TIMEOUT_S are slack for a loaded host.
        _until(
            lambda: results,
            FLUSH_TIMEOUT_S + 5,
            lambda: results.extend(r for r in prefill.step() if isinstance(r, PrefillResult)),
            "prefill did not fail the hand-off to the killed decode within its flush timeout",
        )
        [result] = results
        assert result.request_id == "d" and result.output is None
        assert re.search(r"KV transfer failed.*decode-doomed", result.error), result.error
        assert engine.num_free_blocks == baseline
        assert not engine.requests and not prefill.tickets and not prefill.has_work()

        final = _run_to_end(
            "e",
            PROMPT,
            lambda *a: fresh.call("reserve", *a),
            prefill.submit,
            prefill.step,
            lambda: fresh.call("step"),
        )
        assert final.outputs[0].token_ids == want
        assert engine.num_free_blocks == baseline and not engine.requests
        num_free, num_blocks, num_requests = fresh.call("blocks")
        assert num_free == num_blocks and num_requests == 0
    finally:
        doomed.close()
        fresh.close()
        if prefill is not None:
            prefill.transport.close()


def test_decode_back_under_same_id_is_reconnected(path, want):
    """The connection to a decode engine is lost (here it closes; the same holds for a kill) and
    an engine with the same id listens again at a new address: the next request must reach it."""
    prefill = PrefillWorker(make_engine(path, "prefill", **PREFILL), UcxTransport(host="127.0.0.1"))
    try:
        for attempt in range(2):
            decode = DecodeWorker(
                make_engine(path, "decode", **ENGINE),
                UcxTransport(host="127.0.0.1"),
                engine_id="decode-restarted",
            )
            try:
                final = _run_to_end(
                    f"r{attempt}", PROMPT, decode.reserve, prefill.submit, prefill.step, decode.step
                )
                assert final.outputs[0].token_ids == want
            finally:
                decode.close()
    finally:
        prefill.transport.close()
