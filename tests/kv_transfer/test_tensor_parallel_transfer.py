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
