from __future__ import annotations

import importlib.util

import pytest

# The serving extras (fastapi, httpx) are optional: without them these tests are not collected.
if not all(importlib.util.find_spec(name) for name in ("fastapi", "httpx")):
    collect_ignore_glob = ["test_*.py"]


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
