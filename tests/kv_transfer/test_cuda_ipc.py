"""cuda_ipc on one GPU: a prefill engine in a child process streams KV to a decode engine here."""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing as mp
import random
import time

import pytest
import torch
from disagg_harness import assert_baseline

from pdray import LLM, SamplingParams
from pdray.config import EngineConfig
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import ends_stream
from pdray.kv_transfer.base import Ticket

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(  # only a missing package skips; a broken install fails
        importlib.util.find_spec("cupy") is None,
        reason="cuda_ipc needs cupy (pip install 'pdray[gpu]' or 'pdray[gpu-cu13]')",
    ),
]

ENGINE = {"device": "cuda", "dtype": "float32", "block_size": 4, "num_kv_blocks": 160}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
_ids = itertools.count()


def _prefill_main(path: str, conn) -> None:
    """Child process: a prefill engine that submits what it is sent and reports results."""
    from pdray.disagg.prefill import PrefillWorker
    from pdray.engine.role_worker import PrefillResult
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport

    engine = LLMEngine(EngineConfig(model=path, role="prefill", **ENGINE))
    worker = PrefillWorker(engine, CudaIpcTransport())
    conn.send("ready")
    while True:
        while conn.poll(0 if worker.has_work() else 0.01):
            command, args = conn.recv()
            if command == "close":
                return
            if command == "stats":
                free, total = engine.num_free_blocks, engine.block_manager.num_blocks
                conn.send(("stats", free, total, len(engine.requests), worker.sender.metrics))
                continue
            request_id, prompt, params, ticket = args
            try:
                worker.submit(request_id, prompt, params, Ticket(**ticket))
            except Exception as e:
                conn.send(("result", request_id, f"{type(e).__name__}: {e}"))
        if worker.has_work():
            for result in worker.step():
                if isinstance(result, PrefillResult):
                    conn.send(("result", result.request_id, result.error))


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama3")


@pytest.fixture(scope="module")
def prefill(path):
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=_prefill_main, args=(str(path), child_conn), daemon=True)
    process.start()
    assert conn.poll(300) and conn.recv() == "ready"
    yield conn
    conn.send(("close", ()))
    process.join(timeout=30)
    if process.is_alive():
        process.kill()


@pytest.fixture(scope="module")
def mixed(path):
    return LLM(str(path), **ENGINE)


def expected(mixed, batch) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in mixed.generate(batch, GREEDY, use_tqdm=False)]


@pytest.fixture
def decode(path):
    from pdray.disagg.decode import DecodeWorker
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport

    engine = LLMEngine(EngineConfig(model=str(path), role="decode", **ENGINE))
    worker = DecodeWorker(engine, CudaIpcTransport(), engine_id=f"ipc-decode-{next(_ids)}")
    yield worker
    worker.close()


def prompts(seed: int, lens=(1, 4, 15, 16, 17, 33, 70)) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 384) for _ in range(20)]
    return [shared[: 20 * (n > 10)] + [rng.randrange(3, 384) for _ in range(n)] for n in lens]


def submit(prefill, request_id: str, prompt, params, ticket) -> None:
    prefill.send(("submit", (request_id, prompt, params, ticket.model_dump())))


def results(prefill, count: int, timeout_s: float = 120.0) -> dict[str, str | None]:
    """Prefill results (request id -> error): all KV of these requests was flushed to decode."""
    got = {}
    while len(got) < count:
        assert prefill.poll(timeout_s), "prefill engine did not answer"
        _, request_id, error = prefill.recv()
        got[request_id] = error
    return got


def prefill_stats(prefill):
    prefill.send(("stats", ()))
    _, free, total, num_requests, metrics = prefill.recv()
    return free, total, num_requests, metrics


def run(prefill, decode, batch, params=GREEDY) -> list:
    ids = [f"ipc-{next(_ids)}" for _ in batch]
    for request_id, prompt in zip(ids, batch, strict=True):
        ticket = decode.reserve(request_id, prompt, params)
        assert ticket is not None
        submit(prefill, request_id, prompt, params, ticket)
    assert set(results(prefill, len(ids)).values()) == {None}
    return finish(decode, ids)


def finish(decode, ids: list[str], timeout_s: float = 120.0) -> list:
    """Step the decode engine until these requests finished; their final outputs in order."""
    final, deadline = {}, time.monotonic() + timeout_s
    while len(final) < len(ids) and time.monotonic() < deadline:
        final |= {out.request_id: out for out in decode.step() if ends_stream(out)}
    return [final.get(request_id) for request_id in ids]


def test_greedy_equals_mixed_and_blocks_return(prefill, decode, mixed):
    batch = prompts(1)
    want = expected(mixed, batch)
    for _ in range(2):  # the second round hits the prefix caches on both sides
        outs = run(prefill, decode, batch)
        assert [o.outputs[0].token_ids for o in outs] == want
    free, total, num_requests, metrics = prefill_stats(prefill)
    assert (free, num_requests) == (total, 0)
    assert decode.receiver.metrics.completed == 2 * len(batch)
    assert decode.receiver.metrics.bytes_received == metrics.bytes_sent > 0
    assert decode.engine.block_manager.num_prefix_hits > 0
    assert_baseline(decode.engine)


def test_late_write_after_revoke_is_dropped(prefill, decode, mixed):
    prompt = prompts(2, lens=(45,))[0]
    stale = decode.reserve("late", prompt, GREEDY)
    decode.abort("late")  # revoked: its blocks are free again before any KV arrived
    assert_baseline(decode.engine)
    live = decode.reserve("late", prompt, GREEDY)  # same request, next generation
    assert live.generation > stale.generation
    before = decode.engine.runner.kv_cache.clone()
    sent_before = prefill_stats(prefill)[3].chunks_sent
    dropped_before = decode.receiver.metrics.dropped_messages
    submit(prefill, "late", prompt, GREEDY, stale)
    assert results(prefill, 1) == {"late": None}  # flushed: the receiver saw and dropped it all
    num_chunks = prefill_stats(prefill)[3].chunks_sent - sent_before
    assert num_chunks >= 1
    dropped = decode.receiver.metrics.dropped_messages - dropped_before
    assert dropped == num_chunks + 1  # every chunk message + the hand-off
    assert torch.equal(decode.engine.runner.kv_cache, before)  # not one byte landed
    submit(prefill, "late", prompt, GREEDY, live)
    assert results(prefill, 1) == {"late": None}
    (final,) = finish(decode, ["late"])
    assert final.outputs[0].token_ids == expected(mixed, [prompt])[0]
    assert_baseline(decode.engine)
    free, total, num_requests, _ = prefill_stats(prefill)
    assert (free, num_requests) == (total, 0)


def test_decode_gone_fails_the_prefill_cleanly(prefill, decode):
    prompt = prompts(3, lens=(30,))[0]
    ticket = decode.reserve("gone", prompt, GREEDY)
    decode.close()  # the decode engine disappears before the prefill connects
    submit(prefill, "gone", prompt, GREEDY, ticket)
    error = results(prefill, 1)["gone"]
    assert error and "cuda_ipc" in error
    free, total, num_requests, _ = prefill_stats(prefill)
    assert (free, num_requests) == (total, 0)
