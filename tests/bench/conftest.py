from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

# The benchmark needs the serving extras (httpx; fastapi and uvicorn for the server under test).
if not all(importlib.util.find_spec(name) for name in ("fastapi", "httpx", "uvicorn")):
    collect_ignore_glob = ["test_*.py"]

MODEL = "tiny-llama3"


@pytest.fixture(scope="module")
def served(checkpoint):
    """A tiny random llama3 (vocab 384, 512-token context) behind the OpenAI app, served by
    uvicorn on a port the OS picks; yields its `url`, `engine` and `model` name."""
    from entrypoints.serving_utils import serve

    from pdray.config import EngineConfig
    from pdray.engine.llm_engine import LLMEngine
    from pdray.entrypoints.openai import LocalEngineBackend, build_openai_app

    config = EngineConfig(
        model=str(checkpoint("llama3")), device="cpu", dtype="float32", num_kv_blocks=512
    )
    engine = LLMEngine(config)
    with (
        LocalEngineBackend(engine) as backend,
        serve(build_openai_app(backend, model_name=MODEL)) as url,
    ):
        yield SimpleNamespace(url=url, engine=engine, model=MODEL)
