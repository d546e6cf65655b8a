from __future__ import annotations

from types import SimpleNamespace

import pytest

# Nothing here is probed and skipped: httpx and uvicorn are in the `test` extra, so without them the
# tests that use them error (test_serve_bench imports httpx; `served` imports uvicorn), and the
# others (metric arithmetic, comparisons, argument checks) still run.
MODEL = "tiny-llama3"


@pytest.fixture(scope="module")
def served(checkpoint):
    """A tiny random llama3 (vocab 384, 512-token context) behind the OpenAI app, served by
    uvicorn on a port the OS picks; yields its `url`, `engine` and `model` name."""
    import uvicorn  # noqa: F401  (the `test` extra: missing, the tests that serve error)
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
