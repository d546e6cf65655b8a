"""Backend failures as the HTTP client sees them, with a fake backend: 503, 400, mid-stream."""

from __future__ import annotations

import httpx
import pytest
from serving_utils import assert_openai_error, parse_sse

from pdray.entrypoints.openai.api import NoCapacityError, build_openai_app
from pdray.outputs import CompletionOutput, RequestOutput

pytestmark = pytest.mark.anyio


def output(request_id: str, text: str, finish_reason: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, text, list(range(len(text))), finish_reason=finish_reason)
    return RequestOutput(request_id, None, [1, 2], [completion], finish_reason is not None)


class FakeBackend:
    """Yields the scripted outputs, then raises `error` (if any) instead of finishing."""

    max_model_len = 64
    vocab_size = 100

    def __init__(self, texts: list[str], error: Exception | None = None, finish: str = "length"):
        self.texts, self.error, self.finish = texts, error, finish
        self.aborted: list[str] = []

    async def generate(self, request_id, prompt, params):
        for i, text in enumerate(self.texts):
            last = i == len(self.texts) - 1 and self.error is None
            yield output(request_id, text, self.finish if last else None)
        if self.error is not None:
            raise self.error

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def tokenizer(self):
        raise AssertionError("token-id prompts need no tokenizer")


async def post(backend, body: dict) -> httpx.Response:
    app = build_openai_app(backend, model_name="fake")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/completions", json={"prompt": [1, 2], **body})


@pytest.mark.parametrize("stream", [False, True])
async def test_no_capacity_is_503_and_bad_request_is_400(stream):
    backend = FakeBackend([], NoCapacityError("no decode instance has free KV blocks"))
    error = assert_openai_error(await post(backend, {"stream": stream}), 503)
    assert error["type"] == "service_unavailable_error" and "free KV blocks" in error["message"]
    assert len(backend.aborted) == 1  # closed before its first output: aborted all the same
    backend = FakeBackend([], ValueError("prompt too long for this instance"))
    assert_openai_error(await post(backend, {"stream": stream}), 400)


async def test_error_after_the_first_token():
    backend = FakeBackend(["a", "ab"], RuntimeError("decode replica died"))
    error = assert_openai_error(await post(backend, {}), 500)
    # no internal text to the client: a generic message and the request id (logged there)
    assert "decode replica died" not in error["message"]
    assert "internal server error" in error["message"] and "request id cmpl-" in error["message"]
    r = await post(backend, {"stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]
    assert "request id cmpl-" in events[-1]["error"]["message"]
    assert "decode replica died" not in events[-1]["error"]["message"]
    assert len(backend.aborted) == 2


async def test_backend_that_ends_without_finishing_is_an_error():
    backend = FakeBackend(["a"], finish="length")
    backend.finish = None  # yields an unfinished output, then stops
    error = assert_openai_error(await post(backend, {}), 500)
    assert "before it finished" in error["message"]


async def test_finished_streams_are_not_aborted():
    backend = FakeBackend(["x", "xy", "xyz"], finish="stop")
    r = await post(backend, {"stream": True, "n": 1})
    assert [e["choices"][0]["text"] for e in parse_sse(r.text)] == ["x", "y", "z"]
    assert (await post(backend, {})).json()["choices"][0]["text"] == "xyz"
    assert backend.aborted == []


async def test_health_reflects_the_backend_check():
    backend = FakeBackend([])
    app = build_openai_app(backend, model_name="fake")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).json() == {"status": "ok"}

        async def check_health() -> None:
            raise RuntimeError("no decode instance registered")

        backend.check_health = check_health
        error = assert_openai_error(await client.get("/health"), 503)
        assert "no decode instance" in error["message"]
        backend.check_health = lambda: None  # a plain function works too
        assert (await client.get("/health")).status_code == 200
