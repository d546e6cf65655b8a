"""KV transfer between tensor-parallel groups (CPU, gloo, UCX on loopback): each prefill rank
sends the KV of its heads to the decode ranks holding them, re-sharded when the two sides use
different TP sizes. Greedy outputs equal the mixed TP=1 engine's; no block stays taken.

Each side runs in its own child process (`WorkerProcess`) with its other ranks as processes of
that child, since a process holds one tensor-parallel group. With a GPU the same runs go over
`cuda_ipc` too (eager, float32; with fewer GPUs than ranks the ranks share a GPU and use gloo,
`tensor_parallel_backend="gloo"`, since NCCL refuses two ranks on one device).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from disagg_harness import WorkerProcess  # noqa: E402
from test_parity import greedy, make_prompts, shared_prefix_prompts  # noqa: E402

from pdray import LLM  # noqa: E402
from pdray.engine.role_worker import PrefillResult  # noqa: E402
from pdray.kv_transfer.base import KVLayout, kv_routes, num_senders  # noqa: E402
from pdray.sampling_params import SamplingParams  # noqa: E402

TRANSPORTS = {  # transport: engine arguments of both sides and of the mixed reference
    "ucx": {"device": "cpu", "dtype": "float32", "block_size": 4},
    "cuda_ipc": {
        "device": "cuda",
        "dtype": "float32",
        "block_size": 16,
        "enforce_eager": True,
        "num_kv_blocks": 256,
    },  # fmt: skip
}
TRANSPORT_PARAMS = [  # cuda_ipc runs in the GPU suite (`-m gpu`); only missing packages skip
    pytest.param(
        "cuda_ipc",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            pytest.mark.skipif(
                importlib.util.find_spec("cupy") is None,
                reason="cuda_ipc needs cupy (pip install 'pdray[gpu]' or 'pdray[gpu-cu13]')",
            ),
        ],
    ),
    pytest.param(
        "ucx",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("ucxx") is None,
            reason="ucxx is not installed (pip install 'pdray[ucx]' or 'pdray[ucx-cu13]')",
        ),
    ),
]
CHUNKED = {"max_num_batched_tokens": 64}  # prompts prefill over several steps
CASES = {  # name: (checkpoint overrides, prefill TP, decode TP)
    "P2-D1": ({}, 2, 1),  # 2 KV heads: decode rank 0 gets one head from each prefill rank
    "P1-D2": ({}, 1, 2),  # prefill rank 0 splits its two heads over the decode ranks
    "P2-D2-one-kv-head": ({"num_key_value_heads": 1}, 2, 2),  # replicated on both sides
}
_ids = itertools.count()


def _generate(prefill: WorkerProcess, decode: WorkerProcess, prompts, timeout_s: float = 120):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = [f"tp-{next(_ids)}" for _ in prompts]
    for request_id, prompt in zip(ids, prompts, strict=True):
        ticket = decode.call("reserve", request_id, prompt, params)
        assert ticket is not None
        prefill.call("submit", request_id, prompt, params, ticket)
    final, deadline = {}, time.monotonic() + timeout_s
    while len(final) < len(ids):
        assert time.monotonic() < deadline, f"{len(ids) - len(final)} requests unfinished"
        for result in prefill.call("step"):  # first-token outputs, then each request's result
            if isinstance(result, PrefillResult):
                assert result.error is None, result.error
        for out in decode.call("step", timeout_s=60):
            if out.finished:
                final[out.request_id] = out
    return [final[request_id].outputs[0].token_ids for request_id in ids]


@pytest.mark.parametrize("transport", TRANSPORT_PARAMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_disaggregated_tp_equals_mixed_tp1(checkpoint, case, transport):
    overrides, prefill_tp, decode_tp = CASES[case]
    engine = TRANSPORTS[transport]
    if transport == "cuda_ipc" and torch.cuda.device_count() < max(prefill_tp, decode_tp):
        engine = {**engine, "tensor_parallel_backend": "gloo"}  # NCCL: one rank per GPU
    path = checkpoint("llama3", **overrides)
    rounds = [make_prompts(seed=11), shared_prefix_prompts(seed=5)]  # the 2nd hits decode's cache
    expected = [greedy(LLM(str(path), **engine), prompts) for prompts in rounds]
    engine = {**engine, **CHUNKED}
    prefill = WorkerProcess(
        "prefill", path, {**engine, "tensor_parallel_size": prefill_tp}, transport=transport
    )
    decode = WorkerProcess(
        "decode", path, {**engine, "tensor_parallel_size": decode_tp},
        {"engine_id": f"decode-{case}", "lease_s": 60.0}, transport=transport,
    )  # fmt: skip
    try:
        prefill.start(), decode.start()
        prefill.wait_ready(), decode.wait_ready(timeout_s=120)
        for prompts, want in zip(rounds, expected, strict=True):
            assert _generate(prefill, decode, prompts) == want
        for worker in (prefill, decode):
            free, total, live = worker.call("blocks")
            assert (free, live) == (total, 0), f"{worker.role}: {free}/{total} free, {live} live"
        metrics = decode.call("transfer_metrics")
        assert metrics["completed"] == sum(map(len, rounds)) and metrics["failures"] == 0
    finally:
        prefill.close()
        decode.close()


def _layout(rank: int, size: int, total: int) -> KVLayout:
    heads = total // size if total >= size else 1
    return KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=heads, head_dim=8,
                    dtype="float32", total_kv_heads=total, tp_rank=rank, tp_size=size)  # fmt: skip


@pytest.mark.parametrize(
    ("total", "src_size", "dst_size"),
    [(8, 1, 1), (8, 2, 1), (8, 1, 4), (8, 4, 2), (8, 2, 8), (2, 4, 1), (2, 1, 4), (1, 4, 2)],
)
def test_every_decode_rank_gets_each_of_its_heads_once(total, src_size, dst_size):
    """kv_routes covers each decode rank's heads exactly once, from one prefill rank each, and
    num_senders counts the prefill ranks that send to it."""
    received = {rank: [] for rank in range(dst_size)}
    senders = {rank: set() for rank in range(dst_size)}
    for src_rank in range(src_size):
        src = _layout(src_rank, src_size, total)
        for dst_rank, (lo, hi) in kv_routes(src, dst_size):
            assert src.kv_heads[0] <= lo < hi <= src.kv_heads[1]
            received[dst_rank] += range(lo, hi)
            senders[dst_rank].add(src_rank)
    for rank in range(dst_size):
        dst = _layout(rank, dst_size, total)
        assert sorted(received[rank]) == list(range(*dst.kv_heads))
        assert num_senders(src_size, dst) == len(senders[rank])


_UCX = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed")


@_UCX
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", ["prefill", "decode"])
def test_a_killed_rank_ends_every_request_and_frees_every_block(checkpoint, victim):
    """One side is TP2 (UCX, CPU) and its rank 1 is SIGKILLed after decode reserved and prefill
    took the requests: that side's next step raises naming the rank, and the other side ends
    every request without hanging: prefill's hand-offs to the dead decode rank fail, or decode's
    leases on KV that will never come expire; its blocks all come back."""
    path = checkpoint("llama3")
    engine = {**TRANSPORTS["ucx"], **CHUNKED}
    tp = {"prefill": 1, "decode": 1, victim: 2}
    prefill = WorkerProcess(
        "prefill", path, {**engine, "tensor_parallel_size": tp["prefill"]},
        {"flush_timeout_s": 10.0},
    )  # fmt: skip
    decode = WorkerProcess(
        "decode", path, {**engine, "tensor_parallel_size": tp["decode"]},
        {"engine_id": f"decode-fault-{victim}", "lease_s": 3.0},
    )  # fmt: skip
    target, other = (prefill, decode) if victim == "prefill" else (decode, prefill)
    try:
        prefill.start(), decode.start()
        prefill.wait_ready(), decode.wait_ready(timeout_s=120)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        ids = [f"fault-{victim}-{i}" for i in range(3)]
        for request_id, prompt in zip(ids, make_prompts(seed=21)[:3], strict=True):
            ticket = decode.call("reserve", request_id, prompt, params)
            prefill.call("submit", request_id, prompt, params, ticket)
        os.kill(target.call("follower_pids")[0], signal.SIGKILL)

        # the first step that needs rank 1 raises (decode's: when its leases expire and it
        # must tell rank 1 to drop them)
        with pytest.raises(RuntimeError, match=r"rank 1 \(process\) was killed by SIGKILL"):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                target.call("step")
                time.sleep(0.05)  # steps are cheap here; do not spin the two cores

        ended, deadline = set(), time.monotonic() + 60
        while len(ended) < len(ids):  # the surviving side ends each request, with an error
            assert time.monotonic() < deadline, f"unfinished after 60 s: {set(ids) - ended}"
            for item in other.call("step", timeout_s=60) or []:
                if isinstance(item, PrefillResult):
                    assert item.error, item
                    ended.add(item.request_id)
                elif getattr(item, "finished", False):
                    ended.add(item.request_id)
        free, total, live = other.call("blocks")
        assert (free, live) == (total, 0), f"{other.role}: {free}/{total} free, {live} live"
    finally:
        prefill.close()
        decode.close()
