"""The OpenAI app end to end over a LocalEngineBackend on a tiny checkpoint (in-process ASGI)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from serving_utils import MESSAGES, MODEL, assert_openai_error, parse_sse, wait_idle

from pdray import LLM, SamplingParams
from pdray.entrypoints.openai.api import build_openai_app

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(str(checkpoint("llama3")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def app(backend):
    return build_openai_app(backend, model_name=MODEL)


@pytest.fixture
async def client(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def stream_texts(events: list[dict]) -> tuple[dict[int, str], dict[int, str]]:
    """Concatenated text and the finish reason of each choice index of a completions stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            assert choice["index"] not in reasons, "a choice went on after its finish_reason"
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons


@pytest.mark.parametrize(
    "prompt", [["hello world", "The capital of France is"], [[5, 6, 7, 8], [9]], "one", [3, 4]]
)
async def test_greedy_completions_equal_offline_generate(client, llm, engine, prompt):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    expected = llm.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(len(expected)))
    assert [c["text"] for c in choices] == [e.outputs[0].text for e in expected]
    assert all(c["finish_reason"] == "length" for c in choices)
    prompt_tokens = sum(len(e.prompt_token_ids) for e in expected)
    completion_tokens = 12 * len(expected)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    await wait_idle(engine)


async def test_streamed_completions_equal_non_streamed(client, engine):
    body = {
        "prompt": ["hello world", "The quick brown fox"],
        "n": 2,
        "seed": 7,
        "temperature": 0.8,
        "max_tokens": 10,
        "logprobs": 2,
    }
    whole = (await client.post("/v1/completions", json=body)).json()
    r = await client.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in chunks)
    texts, reasons = stream_texts(chunks)
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    num_tokens = sum(len(c["logprobs"]["tokens"]) for e in chunks for c in e["choices"])
    assert num_tokens == whole["usage"]["completion_tokens"] == 40  # no token sent twice
    for choice in whole["choices"]:
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 10
        assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"])
    await wait_idle(engine)


async def test_chat_stream_equals_non_stream_and_offline_chat(client, llm, engine):
    body = {"model": MODEL, "messages": MESSAGES, **GREEDY}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    assert whole["object"] == "chat.completion"
    offline = llm.chat(MESSAGES, SamplingParams(**GREEDY), use_tqdm=False)[0]
    message = whole["choices"][0]["message"]
    assert message == {"role": "assistant", "content": offline.outputs[0].text}
    assert whole["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    assert whole["usage"]["completion_tokens"] == 12

    r = await client.post(
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    *chunks, last = parse_sse(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in chunks)
    assert content == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    await wait_idle(engine)


async def test_chat_n_choices_streamed_equal_non_streamed(client, engine):
    body = {"messages": MESSAGES, "n": 3, "seed": 11, "max_tokens": 6, "ignore_eos": True}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert whole["usage"]["completion_tokens"] == 18
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    contents: dict[int, str] = {}
    for event in parse_sse(r.text):
        for choice in event["choices"]:
            piece = choice["delta"].get("content") or ""
            contents[choice["index"]] = contents.get(choice["index"], "") + piece
    assert contents == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    await wait_idle(engine)


async def test_stop_string_is_never_streamed(client, engine):
    body = {"prompt": "The quick brown fox", **GREEDY, "max_tokens": 24}
    full = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    stop = full[6:9]
    assert len(stop) == 3
    expected = full[: full.find(stop)]
    cut = (await client.post("/v1/completions", json={**body, "stop": [stop]})).json()
    assert cut["choices"][0]["text"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    r = await client.post("/v1/completions", json={**body, "stop": stop, "stream": True})
    texts, reasons = stream_texts(parse_sse(r.text))
    assert texts == {0: expected} and reasons == {0: "stop"}
    await wait_idle(engine)


async def test_chat_logprobs(client, engine):
    body = {"messages": MESSAGES, **GREEDY, "logprobs": True, "top_logprobs": 3}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 12
    for token in content:
        assert len(token["top_logprobs"]) == 3
        assert token["logprob"] <= token["top_logprobs"][0]["logprob"] + 1e-6  # greedy = top-1
        assert token["bytes"] == list(token["token"].encode())
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    choices = [c for e in parse_sse(r.text) for c in e["choices"]]
    assert choices[0]["logprobs"] is None  # the role chunk
    streamed = [t for c in choices[1:] for t in c["logprobs"]["content"]]
    assert streamed == content
    await wait_idle(engine)


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": [1, 2, 384]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], [-1]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [7] * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": [7] * 500, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * 600}]},
        400,
        "messages",
    ),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 30},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "x"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": "other", "messages": MESSAGES}, 404, "model"),
    ("/v1/embeddings", {"input": "hi"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(client, engine, path, body, status, param):
    if isinstance(body, bytes):
        attempts = [{"content": body}]
    elif "stream" in body or "stream_options" in body:
        attempts = [{"json": body}]
    else:  # streaming requests fail the same way, before any event is sent
        attempts = [{"json": body}, {"json": {**body, "stream": True}}]
    for kwargs in attempts:
        assert_openai_error(await client.post(path, **kwargs), status, param)
    assert not engine.requests


async def test_models_health_and_api_key(backend):
    app = build_openai_app(backend, model_name=MODEL, api_key="s3cret")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = assert_openai_error(await client.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        r = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        model = r.json()["data"][0]
        assert r.json()["object"] == "list" and model["id"] == MODEL and model["object"] == "model"
        assert model["max_model_len"] == backend.max_model_len


async def test_48_concurrent_requests(client, engine):
    async def one(i: int) -> int:
        if i % 3 == 0:
            body = {"messages": [{"role": "user", "content": f"question {i}"}], **GREEDY}
            r = await client.post("/v1/chat/completions", json={**body, "max_tokens": 8})
            return r.json()["usage"]["completion_tokens"]
        body = {"prompt": f"request number {i}", **GREEDY, "max_tokens": 8}
        if i % 3 == 1:
            return (await client.post("/v1/completions", json=body)).json()["usage"][
                "completion_tokens"
            ]
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        events = parse_sse((await client.post("/v1/completions", json=body)).text)
        return events[-1]["usage"]["completion_tokens"]

    assert await asyncio.gather(*(one(i) for i in range(48))) == [8] * 48
    await wait_idle(engine)
