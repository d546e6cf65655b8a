"""LocalEngineBackend: outputs, bad input, abort frees blocks, several event loops, close."""

from __future__ import annotations

import asyncio
import threading

import pytest
from serving_utils import wait_idle

from pdray import SamplingParams
from pdray.config import EngineConfig
from pdray.engine.llm_engine import LLMEngine
from pdray.entrypoints.openai.api import LocalEngineBackend

pytestmark = pytest.mark.anyio


async def test_generate_yields_cumulative_outputs_until_finished(backend, engine):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = [out async for out in backend.generate("cumulative", [5, 6, 7], params)]
    assert outputs[-1].finished and not any(out.finished for out in outputs[:-1])
    token_ids = [out.outputs[0].token_ids for out in outputs]
    assert all(a == b[: len(a)] for a, b in zip(token_ids, token_ids[1:], strict=False))
    assert len(token_ids[-1]) == 6
    await wait_idle(engine)


async def test_bad_prompt_raises_value_error(backend, engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        async for _ in backend.generate("bad", [10**6], SamplingParams()):
            pass
    await wait_idle(engine)


async def test_abort_frees_blocks_and_ends_the_stream(backend, engine):
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    stream = backend.generate("long", list(range(1, 40)), params)
    first = await anext(stream)
    assert not first.finished
    await backend.abort("long")  # returns once the engine thread has freed the blocks
    assert "long" not in engine.requests
    rest = [out async for out in stream]
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    await backend.abort("long")  # idempotent, unknown ids are fine
    await wait_idle(engine)


async def test_leaving_generate_early_aborts(backend, engine):
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    stream = backend.generate("left", [3, 4, 5], params)
    await anext(stream)
    await stream.aclose()
    await wait_idle(engine)


def test_requests_from_several_event_loops(backend, engine):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        async def one() -> list[int]:
            async for out in backend.generate(f"loop-{i}", [7, 8, 9], params):
                last = out
            return last.outputs[0].token_ids

        results[i] = asyncio.run(one())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"{t.name}'s request did not end within 30 s"
    assert len(results) == 4 and all(ids == results[0] for ids in results.values())
    asyncio.run(wait_idle(engine))


async def test_close_fails_pending_requests_and_rejects_new_ones(checkpoint):
    config = EngineConfig(model=str(checkpoint("llama3")), device="cpu", dtype="float32")
    engine = LLMEngine(config)
    backend = LocalEngineBackend(engine)
    stream = backend.generate("pending", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
    await anext(stream)
    await asyncio.to_thread(backend.close)
    with pytest.raises(RuntimeError, match="closed"):
        async for _ in stream:
            pass
    assert not engine.requests and engine.num_free_blocks == engine.block_manager.num_blocks
    with pytest.raises(RuntimeError, match="closed"):
        await anext(backend.generate("late", [1], SamplingParams()))
    await backend.abort("late")  # a no-op once closed
    with pytest.raises(ValueError, match="mixed-role"):
        LocalEngineBackend(LLMEngine(config.replace(role="prefill")))
