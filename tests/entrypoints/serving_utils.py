"""Helpers of the OpenAI server tests: SSE parsing, leak checks, a spy backend, uvicorn."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODEL = "tiny-llama3"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The JSON events of an SSE body, checking it ends with exactly one [DONE]."""
    events = [block for block in text.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def assert_openai_error(response, status: int, param: str | None = "any") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


async def wait_until(condition, timeout_s: float, failure: str) -> Any:
    """condition()'s first truthy value, polled every 10 ms without blocking the event loop;
    AssertionError "{failure} within {timeout_s} s" after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{failure} within {timeout_s} s"
        await asyncio.sleep(0.01)
    return value


async def wait_idle(engine, timeout_s: float = 10.0) -> None:
    """Every request gone from the engine and every KV block free again."""
    deadline = time.monotonic() + timeout_s
    while engine.requests or engine.num_free_blocks != engine.block_manager.num_blocks:
        assert time.monotonic() < deadline, (
            f"leak: {len(engine.requests)} requests, "
            f"{engine.num_free_blocks}/{engine.block_manager.num_blocks} blocks free"
        )
        await asyncio.sleep(0.01)


class SpyBackend:
    """Delegates to a real backend and records the requests it starts and the aborts it is asked
    for."""

    def __init__(self, inner):
        self.inner = inner
        self.max_model_len = inner.max_model_len
        self.vocab_size = inner.vocab_size
        self.started: list[str] = []
        self.aborted: list[str] = []

    def generate(self, request_id, prompt, params):
        self.started.append(request_id)
        return self.inner.generate(request_id, prompt, params)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await self.inner.abort(request_id)

    def tokenizer(self):
        return self.inner.tokenizer()


@contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` with uvicorn on a port the OS picks; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
