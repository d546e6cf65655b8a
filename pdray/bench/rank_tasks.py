"""Benchmark work every rank of a tensor-parallel engine runs (`tp_group.create` or
`run_together` pickle these by module and name, so they live in an importable module: the
follower processes cannot import a script's `__main__`)."""

from __future__ import annotations

import torch

from pdray.bench.timing import device_median_ms
from pdray.worker.model_runner import ModelRunner
from pdray.worker.parallel import all_reduce, bound


def fill_kv_cache_normal(runner: ModelRunner) -> None:
    """Random KV values on this rank (a decode step then reads non-trivial data). With tensor
    parallel, rank 0 also has every follower run it: `tp_group.create(name, fill_kv_cache_normal)`
    calls it with the follower's runner and keeps the None it returns."""
    runner.kv_cache.normal_()


def time_all_reduces(runner: ModelRunner, token_counts: list[int], iters: int) -> dict:
    """Device ms of one all-reduce of [tokens, hidden] in the model's dtype, per token count:
    (the path the model takes, NCCL alone), each replayed from a CUDA graph of `iters`
    consecutive all-reduces (as decode runs them; eager timing would add the launch), on this
    rank's collectives (every rank runs it at once: `tp_group.run_together`)."""
    out = {}
    backend = runner.tp.collectives.backend

    def graphed(fn, x):
        fn(x)  # warm-up: compiles, creates NCCL's communicator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn(x)
        return device_median_ms(graph.replay, 5) / iters

    with bound(runner.tp):
        for tokens in token_counts:
            x = torch.randn(tokens, runner.arch.hidden_size, dtype=runner.dtype,
                            device=runner.device)  # fmt: skip
            used = graphed(all_reduce, x)
            nccl = graphed(lambda x: backend.allreduce([x]).wait(), x)
            out[tokens] = (used, nccl)
    return out
