"""The app behind a real uvicorn server: the official openai client, and client disconnects."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import uvicorn  # noqa: F401 (a dependency the tests need: missing fails)
from serving_utils import MESSAGES, MODEL, SpyBackend, serve, wait_idle, wait_until

from pdray import LLM, SamplingParams
from pdray.entrypoints.openai.api import build_openai_app

pytestmark = pytest.mark.anyio
API_KEY = "test-key"


@pytest.fixture(scope="module")
def spy(backend) -> SpyBackend:
    return SpyBackend(backend)


@pytest.fixture(scope="module")
def base_url(spy):
    with serve(build_openai_app(spy, model_name=MODEL, api_key=API_KEY)) as url:
        yield url


@pytest.fixture
async def client(base_url):
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY) as client:
        yield client


async def test_official_client_completions_chat_and_models(client, checkpoint, engine):
    llm = LLM(str(checkpoint("llama3")), device="cpu", dtype="float32")
    expected = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    completion = await client.completions.create(
        model=MODEL, prompt="hello", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text == expected[0].outputs[0].text
    assert completion.usage.completion_tokens == len(expected[0].outputs[0].token_ids)

    chat = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0
    )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens

    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    await wait_idle(engine)


async def test_official_client_errors(client, base_url):
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    assert bad.value.body["param"] == "max_tokens"
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="wrong") as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()


async def read_until_first_event(url: str, body: dict) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", url, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                break  # leaving the block closes the connection mid-stream


async def leave_once_started(request, started: list[str]) -> None:
    """Send `request` and leave (cancel it, which closes the connection) as soon as the backend
    has started it (`started` grew), so the client always leaves mid-request."""
    num_started = len(started)
    task = asyncio.ensure_future(request)
    await wait_until(
        lambda: len(started) > num_started or task.done(),
        30,
        "the server did not start the request",
    )
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled(), "the request ended before the client left"


LONG = {"max_tokens": 480, "ignore_eos": True}  # ~0.3-1 s on CPU: still running when we leave


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_disconnect_mid_stream_aborts_and_frees_blocks(base_url, spy, engine, path):
    body = {"prompt": [5, 6, 7]} if path == "/v1/completions" else {"messages": MESSAGES[1:]}
    aborted_before = len(spy.aborted)
    await read_until_first_event(base_url + path, {**body, **LONG, "stream": True})
    await wait_until(lambda: len(spy.aborted) > aborted_before, 10, "the server did not abort")
    await wait_idle(engine)
    assert len(spy.aborted) == aborted_before + 1


async def test_disconnect_while_waiting_for_a_whole_response_aborts(base_url, spy, engine):
    aborted_before = len(spy.aborted)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=30) as http:
        request = http.post(
            base_url + "/v1/completions", json={"prompt": [9, 9, 9], **LONG}, headers=headers
        )
        await leave_once_started(request, spy.started)
    # The request may not have reached the engine yet: wait for the abort, then for idle.
    await wait_until(lambda: len(spy.aborted) > aborted_before, 10, "the server did not abort")
    await wait_idle(engine)
    assert len(spy.aborted) == aborted_before + 1


class SlowFirstTokenBackend:
    """Never produces a first token: stands for a long prefill or a congested pair."""

    max_model_len = 64
    vocab_size = 100

    def __init__(self):
        self.started: list[str] = []
        self.aborted: list[str] = []

    async def generate(self, request_id, prompt, params):
        self.started.append(request_id)
        await asyncio.sleep(60)  # the scenario: no first token before the client leaves
        yield  # pragma: no cover

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def tokenizer(self):
        raise AssertionError("token-id prompts need no tokenizer")


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_the_first_token_aborts(stream):
    backend = SlowFirstTokenBackend()
    with serve(build_openai_app(backend, model_name=MODEL)) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"prompt": [1, 2], "stream": stream}
            await leave_once_started(http.post(url + "/v1/completions", json=body), backend.started)
        await wait_until(lambda: backend.aborted, 10, "the server did not abort the request")
    assert backend.aborted == backend.started and len(backend.started) == 1
