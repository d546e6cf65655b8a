"""Prefill -> KV transfer -> decode equals the mixed engine, and every fault path frees its blocks."""

from __future__ import annotations

import random

import pytest
from disagg_harness import assert_baseline, make_pair, run, wait_until

from pdray import LLM, SamplingParams
from pdray.engine.role_worker import FailureKind, HandoffFailed, PrefillResult
from pdray.kv_transfer.base import FailurePolicy, LayerChunk, merge_runs
from pdray.kv_transfer.local import LocalTransport

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def prompts(seed: int, lens=(1, 4, 15, 16, 17, 33, 70)) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 384) for _ in range(20)]
    return [
        (shared + [rng.randrange(3, 384) for _ in range(n)])[: max(n, 1) + 20 * (n > 10)]
        for n in lens
    ]


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama3")


@pytest.fixture(scope="module")
def mixed(path):
    return LLM(str(path), device="cpu", dtype="float32", block_size=4)


def expected(mixed, batch, params=GREEDY):
    return [o.outputs[0].token_ids for o in mixed.generate(batch, params, use_tqdm=False)]


def test_merge_runs():
    runs = merge_runs([4, 5, 6, 9, 10], [0, 1, 7, 8, 9])
    assert [(r.src, r.dst, r.num_blocks) for r in runs] == [(4, 0, 2), (6, 7, 1), (9, 8, 2)]


@pytest.mark.parametrize("chunk", [None, 8])
def test_disaggregated_equals_mixed_with_prefix_caching(path, mixed, chunk):
    kw = {"block_size": 4} | ({"max_num_batched_tokens": chunk} if chunk else {})
    prefill, decode = make_pair(path, prefill_kwargs=kw, decode_kwargs=kw)
    batch = prompts(1)
    want = expected(mixed, batch)
    for _ in range(2):  # the second round hits the prefix caches on both sides
        outs, _ = run(prefill, decode, batch, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == want
    assert decode.engine.block_manager.num_prefix_hits > 0
    assert prefill.engine.block_manager.num_prefix_hits > 0
    assert decode.receiver.metrics.completed == 2 * len(batch)
    assert decode.receiver.metrics.bytes_received == prefill.sender.metrics.bytes_sent
    assert_baseline(prefill.engine, decode.engine)


def test_decode_side_prefix_hit_skips_sending(path, mixed):
    prefill, decode = make_pair(
        path, prefill_kwargs={"block_size": 4}, decode_kwargs={"block_size": 4}
    )
    batch = prompts(2, lens=(40,))
    run(prefill, decode, batch, GREEDY)
    sent = prefill.sender.metrics.bytes_sent
    prefill2, _ = make_pair(path, prefill_kwargs={"block_size": 4})
    outs, _ = run(prefill2, decode, batch, GREEDY)
    assert outs[0].outputs[0].token_ids == expected(mixed, batch)[0]
    assert 0 < prefill2.sender.metrics.bytes_sent < sent  # decode already held most blocks
    assert_baseline(prefill.engine, prefill2.engine, decode.engine)


def test_sampling_state_and_logprobs_continue_on_decode(path, mixed):
    params = SamplingParams(temperature=0.9, top_k=50, seed=11, n=2, max_tokens=6, logprobs=2)
    batch = prompts(3, lens=(9, 30))
    want = [[c.token_ids for c in o.outputs] for o in mixed.generate(batch, params, use_tqdm=False)]
    prefill, decode = make_pair(
        path, prefill_kwargs={"block_size": 4}, decode_kwargs={"block_size": 4}
    )
    outs, _ = run(prefill, decode, batch, params)
    assert [[c.token_ids for c in o.outputs] for o in outs] == want
    assert all(len(c.logprobs) == 6 for o in outs for c in o.outputs)
    assert_baseline(prefill.engine, decode.engine)


@pytest.mark.parametrize(
    "policy", [FailurePolicy.RECOMPUTE, FailurePolicy.FAIL, FailurePolicy.RETRY]
)
def test_lease_expiry_applies_policy_and_refuses_late_writes(path, mixed, policy):
    prefill, decode = make_pair(path, policy=policy)
    batch = prompts(4, lens=(12, 25))
    failures: dict = {}
    # expired before prefill runs
    outs, ids = run(prefill, decode, batch, GREEDY, lease_s=-1.0, failures=failures)
    if policy is FailurePolicy.RECOMPUTE:
        assert [o.outputs[0].token_ids for o in outs] == expected(mixed, batch)
        assert failures == {}
    else:
        assert outs == [None, None]
        kind = FailureKind.RETRY if policy is FailurePolicy.RETRY else FailureKind.FAILED
        assert {i: (type(e), e.kind) for i, e in failures.items()} == {
            i: (HandoffFailed, kind) for i in ids
        }
    assert decode.receiver.metrics.expired_leases == 2
    assert decode.receiver.metrics.dropped_messages > 0  # the late chunks were refused
    assert_baseline(prefill.engine, decode.engine)


class FlakyTransport(LocalTransport):
    """Fails the send of the chunk holding one layer's KV."""

    fail_layer = 1

    def send(self, peer_id, message, payload):
        layers = range(message.layer, message.layer + message.num_layers) if isinstance(
            message, LayerChunk) else ()  # fmt: skip
        if self.fail_layer in layers:
            raise OSError("injected transfer error")
        super().send(peer_id, message, payload)


def test_injected_transfer_error_recomputes(path, mixed):
    prefill, decode = make_pair(path, transport_factory=FlakyTransport)
    batch = prompts(5, lens=(7, 20))
    outs, _ = run(prefill, decode, batch, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected(mixed, batch)
    assert decode.receiver.metrics.failures == 2 and decode.receiver.metrics.completed == 0
    assert_baseline(prefill.engine, decode.engine)


def test_client_abort_during_transfer(path):
    prefill, decode = make_pair(path, prefill_kwargs={"max_num_batched_tokens": 8})
    batch = prompts(6, lens=(60,))
    ticket = decode.reserve("a", batch[0], GREEDY)
    prefill.submit("a", batch[0], GREEDY, ticket)
    prefill.step()  # first chunk of 8 tokens sent, more to come
    assert decode.engine.num_free_blocks < decode.engine.block_manager.num_blocks
    decode.abort("a")
    prefill.abort("a")
    for _ in range(3):
        prefill.step()
        decode.step()
    assert_baseline(prefill.engine, decode.engine)


def test_prefill_dies_mid_transfer_lease_expires(path, mixed):
    prefill, decode = make_pair(path, prefill_kwargs={"max_num_batched_tokens": 8})
    batch = prompts(7, lens=(50,))
    ticket = decode.reserve("p", batch[0], GREEDY, lease_s=0.2)
    prefill.submit("p", batch[0], GREEDY, ticket)
    prefill.step()  # some layers of the first chunk arrived; then the prefill engine "dies"
    # Decode notices the expired lease in its first step after the deadline, then recomputes.
    [final] = wait_until(
        lambda: [o for o in decode.step() if o.finished],
        30,
        "decode did not recompute after the lease expired",
        poll_s=0,
    )
    assert final.outputs[0].token_ids == expected(mixed, batch)[0]  # recomputed on decode
    assert decode.receiver.metrics.expired_leases == 1
    assert_baseline(decode.engine)


def test_decode_gone_prefill_releases(path):
    from pdray.kv_transfer.base import TransferError

    prefill, decode = make_pair(path, prefill_kwargs={"max_num_batched_tokens": 8})
    batch = prompts(8, lens=(40,))
    ticket = decode.reserve("d", batch[0], GREEDY)
    prefill.submit("d", batch[0], GREEDY, ticket)
    prefill.step()  # the first chunk went through
    decode.close()  # then the decode engine disappears
    results = wait_until(
        lambda: [r for r in prefill.step() if isinstance(r, PrefillResult)],
        30,
        "the hand-off to the closed decode engine did not end",
        poll_s=0,
    )
    assert results[0].error and "KV transfer failed" in results[0].error
    ticket = decode.reserve("e", batch[0], GREEDY)
    decode.engine.abort_request("e")
    fresh_prefill, _ = make_pair(path)
    with pytest.raises(TransferError, match="no local KV receiver"):
        fresh_prefill.submit("e", batch[0], GREEDY, ticket)  # refused up front, nothing queued
    assert_baseline(prefill.engine, fresh_prefill.engine, decode.engine)
