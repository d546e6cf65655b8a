"""The one-shot peer all-reduce (kernels/all_reduce.py) on two GPUs, inside a TP=2 engine's own
group: equal to NCCL's all-reduce within rounding, the same bits on every rank, eager and replayed
from a CUDA graph. (Engine-level parity with CUDA graphs: tests/test_tensor_parallel.py with
PDRAY_TP_TEST_DEVICE=cuda.)"""

from __future__ import annotations

import pytest
import torch

from pdray import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

SIZES = [1, 7, 4096, 64 * 4096 - 5, (1 << 20) // 2]  # up to the 1 MiB limit (larger: NCCL)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _compare(runner, sizes: list[int], dtype_name: str, graph: bool) -> list[tuple]:
    """On every rank: peer all-reduce vs NCCL's of the same rank-seeded inputs; on rank 0 the
    largest relative difference per size and whether the ranks got identical results."""
    dtype = getattr(torch, dtype_name)
    collectives = runner.tp.collectives
    fast, nccl = collectives.fast, collectives.backend
    assert fast is not None, "the peer all-reduce was not set up"
    device = runner.device
    rows = []
    for n in sizes:
        if n * dtype.itemsize > fast.max_bytes:  # NCCL's (Collectives.all_reduce picks it)
            continue
        gen = torch.Generator(device=device).manual_seed(1000 * runner.tp.rank + n)
        x = torch.randn(n, generator=gen, device=device, dtype=torch.float32).to(dtype)
        ours = x.clone()
        if graph:
            static = x.clone()
            fast(static)  # warm-up (compiles the kernel) outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fast(static)
            for _ in range(3):  # replays reuse the buffers' two slots in turn
                static.copy_(x)
                g.replay()
            ours = static
        else:
            fast(ours)
        want = x.clone()
        nccl.allreduce([want]).wait()
        doubled = ours.clone()  # identical on both ranks <=> the sum is exactly 2 x ours
        nccl.allreduce([doubled]).wait()
        torch.cuda.synchronize()
        scale = want.float().abs().max().clamp_min(1e-6)
        diff = ((ours.float() - want.float()).abs().max() / scale).item()
        rows.append((n, diff, torch.equal(doubled, ours * 2)))
    return rows


@pytest.fixture(scope="module")
def engine(checkpoint):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    mp = pytest.MonkeyPatch()
    mp.setenv("PDRAY_PEER_ALL_REDUCE", "1")  # opt-in; the followers inherit the environment
    path = checkpoint("llama3")
    with LLM(str(path), device="cuda", dtype="float32", tensor_parallel_size=2,
             block_size=16, num_kv_blocks=64) as llm:  # fmt: skip
        yield llm.engine.runner
    mp.undo()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_peer_all_reduce_equals_nccl(engine, dtype, graph):
    rows = engine.tp_group.run_together(_compare, engine, SIZES, dtype, graph)
    assert len(rows) >= 4
    for n, diff, same_on_ranks in rows:
        assert diff <= TOLERANCE[getattr(torch, dtype)], (n, diff)
        assert same_on_ranks, f"size {n}: the ranks' results differ"
