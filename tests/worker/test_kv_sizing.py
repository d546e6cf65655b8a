"""KV-cache sizing: the profiling step is a valid batch, and on a GPU the cache fills this
instance's share of the GPU and no more."""

from __future__ import annotations

import pytest
import torch

from pdray.config import EngineConfig
from pdray.sampling_params import SamplingParams
from pdray.worker.model_runner import ModelRunner


@pytest.mark.parametrize(
    ("max_tokens", "max_seqs", "max_len"), [(64, 4, 64), (50, 8, 16), (7, 16, 32)]
)
def test_largest_step_covers_the_budget(checkpoint, max_tokens, max_seqs, max_len):
    config = EngineConfig(model=str(checkpoint("llama3")), device="cpu", dtype="float32",
                          max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs)  # fmt: skip
    runner = ModelRunner(config)
    batch, num_blocks = runner.largest_step(max_len)
    assert batch.num_tokens == min(max_tokens, max_seqs * max_len)
    assert len(batch.query_lens) == min(max_seqs, batch.num_tokens)
    assert max(batch.query_lens) <= max_len
    assert len(set(batch.slot_mapping)) == batch.num_tokens  # no two tokens share a slot
    assert max(batch.slot_mapping) < num_blocks * config.block_size
    runner._bind_kv_cache(num_blocks)
    tokens = runner.execute(batch)
    assert len(tokens) == len(batch.query_lens)
    runner._bind_kv_cache(None)
    assert runner.kv_cache is None and all(a.kv_cache is None for a in runner.attention_layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_fills_the_share_and_no_more():
    from pdray.engine.llm_engine import LLMEngine

    utilization = 0.3
    total = torch.cuda.mem_get_info()[1]
    engine = LLMEngine(EngineConfig(model="dummy:qwen2.5-0.5b", gpu_memory_utilization=utilization))
    used_by_torch = torch.cuda.memory_reserved()
    print(
        f"KV cache {engine.runner.kv_cache.nbytes / 2**30:.2f} GiB, torch holds "
        f"{used_by_torch / 2**30:.2f} GiB of a {utilization * total / 2**30:.2f} GiB share"
    )
    assert used_by_torch <= utilization * total
    assert engine.runner.kv_cache.nbytes >= 0.5 * utilization * total  # the cache takes most of it
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs[-1].outputs[0].token_ids) == 4
