from __future__ import annotations

import importlib.util
import socket
import threading
import time
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
    import uvicorn

    from pdray.config import EngineConfig
    from pdray.engine.llm_engine import LLMEngine
    from pdray.entrypoints.openai import LocalEngineBackend, build_openai_app

    config = EngineConfig(
        model=str(checkpoint("llama3")), device="cpu", dtype="float32", num_kv_blocks=512
    )
    engine = LLMEngine(config)
    with LocalEngineBackend(engine) as backend:
        app = build_openai_app(backend, model_name=MODEL)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            yield SimpleNamespace(url=url, engine=engine, model=MODEL)
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()
