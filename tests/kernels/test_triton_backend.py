"""On a GPU, in float32: the Triton backend gives the torch backend's greedy tokens exactly, and a
decode step replayed from a CUDA graph gives the eager step's hidden states."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_utils import HAS_CUDA

from pdray import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

SCENARIOS = {
    "batched": {},
    "small_chunks": {"max_num_batched_tokens": 16, "block_size": 4},
    "sdpa_prefill": {"sdpa_min_tokens": 8},
}


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 384) for _ in range(37)]
    fresh = [[rng.randrange(3, 384) for _ in range(n)] for n in (1, 3, 17, 64, 100)]
    return fresh + [prefix + [rng.randrange(3, 384) for _ in range(n)] for n in (1, 5, 20)]


def greedy(path, backend: str, **kwargs) -> list[list[int]]:
    llm = LLM(
        str(path),
        device="cuda",
        dtype="float32",
        attention_backend=backend,
        num_kv_blocks=kwargs.pop("num_kv_blocks", 512),
        **kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts(7), params, use_tqdm=False)
    assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("family", ["llama3", "qwen3", "mistral"])
def test_triton_greedy_matches_torch(checkpoint, monkeypatch, family, scenario):
    from pdray.attention import triton_backend

    kwargs = dict(SCENARIOS[scenario])
    monkeypatch.setattr(triton_backend, "SDPA_MIN_TOKENS", kwargs.pop("sdpa_min_tokens", 1024))
    path = checkpoint(family)
    assert greedy(path, "triton", **kwargs) == greedy(path, "torch", **kwargs)


def test_decode_graph_matches_eager(checkpoint):
    from pdray.attention.base import ForwardContext, forward_context
    from pdray.config import EngineConfig
    from pdray.worker.batch import StepBatch
    from pdray.worker.cuda_graph import DecodeCudaGraphs
    from pdray.worker.model_runner import ModelRunner

    config = EngineConfig(
        model=str(checkpoint("llama3")),
        device="cuda",
        dtype="float32",
        attention_backend="triton",
        num_kv_blocks=64,
        block_size=4,
    )
    runner = ModelRunner(config)
    runner.allocate_kv_cache(64)
    runner.kv_cache.normal_()
    graphs = DecodeCudaGraphs(
        runner.model,
        runner.backend,
        max_num_seqs=8,
        max_model_len=128,
        block_size=4,
        hidden_size=runner.arch.hidden_size,
        dtype=runner.dtype,
        device=runner.device,
        batch_sizes=[1, 4, 8],
    )
    graphs.capture()
    seq_lens = [5, 40, 1]  # a 3-sequence step replays the 4-row graph
    tables = [list(range(0, 2)), list(range(2, 12)), [12]]
    batch = StepBatch(
        input_ids=[11, 22, 33],
        positions=[n - 1 for n in seq_lens],
        slot_mapping=[
            t[(n - 1) // 4] * 4 + (n - 1) % 4 for t, n in zip(tables, seq_lens, strict=True)
        ],
        query_lens=[1, 1, 1],
        seq_lens=seq_lens,
        block_tables=tables,
        sample_indices=[0, 1, 2],
        sampling_rows=[],
    )
    assert graphs.can_run(batch)
    with torch.inference_mode():
        meta = runner._metadata(batch)
        ids = torch.tensor(batch.input_ids, device="cuda")
        pos = torch.tensor(batch.positions, device="cuda")
        with forward_context(ForwardContext(meta, runner.backend)):
            eager = runner.model.compute_logits(runner.model(ids, pos))
        replayed = graphs.run(batch).clone()
        again = graphs.run(batch).clone()
    assert torch.allclose(replayed, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(replayed, again)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("seq_len", "cudnn_min"), [(1500, 4096), (4100, 4096), (300, 256)])
def test_fresh_prompt_sdpa_matches_float32_attention(monkeypatch, dtype, seq_len, cudnn_min):
    """`causal_sdpa` without cuDNN below CUDNN_MIN_TOKENS, and with cuDNN on a padded length
    above it (4100 -> 5120; 300 -> 512 with the threshold lowered to 256), equals float32
    attention computed directly."""
    from pdray.attention import triton_backend

    monkeypatch.setattr(triton_backend, "CUDNN_MIN_TOKENS", cudnn_min)
    monkeypatch.setattr(triton_backend, "CUDNN_LEN_MULTIPLE", min(1024, cudnn_min))
    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    q, k, v = (torch.randn(seq_len, h, 128, device="cuda", generator=gen).to(dtype)
               for h in (32, 8, 8))  # fmt: skip
    got = triton_backend.causal_sdpa(q, k, v, 128**-0.5)
    assert got.shape == q.shape and got.dtype == dtype
    kf, vf = (t.float().repeat_interleave(4, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * 128**-0.5
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device="cuda").triu(1)
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(mask, float("-inf")).softmax(-1), vf)
    assert (got.float() - ref).abs().max().item() < 2e-2
