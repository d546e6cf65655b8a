from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine(checkpoint):
    from pdray.config import EngineConfig
    from pdray.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=str(checkpoint("llama3")), device="cpu", dtype="float32", num_kv_blocks=512
    )
    return LLMEngine(config)


@pytest.fixture(scope="module")
def backend(engine):
    from pdray.entrypoints.openai.api import LocalEngineBackend

    with LocalEngineBackend(engine) as backend:
        yield backend


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
