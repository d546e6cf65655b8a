"""Hostile input against the local OpenAI server (uvicorn): every bad request ends quickly with
a 4xx OpenAI error object that names the field at fault and no internals, and the server serves
a normal request afterwards. Then errors from the backend (Ray's wrappers included) as the
client sees them: the original message for a bad request, a generic 500 naming the request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
import traceback

import httpx
import pytest
from serving_utils import (
    MESSAGES,
    MODEL,
    assert_openai_error,
    parse_sse,
    serve,
    wait_idle,
    wait_until,
)

from pdray.entrypoints.openai.api import NoCapacityError, build_openai_app
from pdray.entrypoints.openai.protocol import MAX_CHARS_PER_TOKEN
from pdray.outputs import CompletionOutput, RequestOutput
from pdray.router.deadline import RequestTimeoutError

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MAX_MODEL_LEN = 512  # the tiny checkpoint's
INTERNAL = re.compile(
    r"ray::|ServeReplica|pid=|ip=|Traceback|File \"|0x[0-9a-f]{6,}|RayTaskError|site-packages|"
    r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
)
FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty"]  # fmt: skip
HUGE = 2**80


def raw(body: dict) -> bytes:
    """JSON as Python writes it: NaN and Infinity literals included."""
    return json.dumps(body).encode()


def cmpl(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


# (id, path, body (dict, or bytes sent as is), status, param)
CASES = [
    *[
        (f"{path}-{field}-{value}", path, make(**{field: value}), 400, field)
        for path, make in ((CMPL, cmpl), (CHAT, chat))
        for field in FLOATS
        for value in (math.nan, math.inf, -math.inf)
    ],
    ("overflowing-float", CMPL, b'{"prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    ("logit_bias-nan", CMPL, cmpl(logit_bias={"5": math.nan}), 400, "logit_bias"),
    ("seed-2**80", CMPL, cmpl(seed=HUGE), 400, "seed"),
    ("seed--2**80", CMPL, cmpl(seed=-HUGE), 400, "seed"),
    ("seed-2**63", CHAT, chat(seed=2**63), 400, "seed"),
    ("n-10000", CMPL, cmpl(n=10000), 400, "n"),
    ("chat-n-10000", CHAT, chat(n=10000), 400, "n"),
    ("n-2**80", CMPL, cmpl(n=HUGE), 400, "n"),
    ("n-0", CMPL, cmpl(n=0), 400, "n"),
    ("n-negative", CHAT, chat(n=-3), 400, "n"),
    ("best_of-10000", CMPL, cmpl(best_of=10000), 400, "best_of"),
    ("best_of-over-n", CMPL, cmpl(best_of=2), 400, "best_of"),
    ("logprobs-21", CMPL, cmpl(logprobs=21), 400, "logprobs"),
    ("logprobs-negative", CMPL, cmpl(logprobs=-1), 400, "logprobs"),
    ("logprobs-2**80", CMPL, cmpl(logprobs=HUGE), 400, "logprobs"),
    ("echo-logprobs-21", CMPL, cmpl(echo=True, logprobs=21), 400, "logprobs"),
    ("top_logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs-2**80", CHAT, chat(logprobs=True, top_logprobs=HUGE), 400, "top_logprobs"),
    ("max_tokens-negative", CMPL, cmpl(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-0", CMPL, cmpl(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-huge", CMPL, cmpl(max_tokens=10**18), 400, "max_tokens"),
    ("max_tokens-2**80", CMPL, cmpl(max_tokens=HUGE), 400, "max_tokens"),
    (
        "max_completion_tokens-huge",
        CHAT,
        chat(max_tokens=None, max_completion_tokens=10**9),
        400,
        "max_completion_tokens",
    ),  # fmt: skip
    ("min_tokens-huge", CHAT, chat(max_tokens=None, min_tokens=10**9), 400, "min_tokens"),
    ("min_tokens-over-max", CMPL, cmpl(min_tokens=5), 400, "min_tokens"),
    ("top_k-negative", CMPL, cmpl(top_k=-2), 400, "top_k"),
    ("top_k-2**80", CMPL, cmpl(top_k=HUGE), 400, "top_k"),
    ("stop-17", CMPL, cmpl(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-long", CHAT, chat(stop="x" * 10_000), 400, "stop"),
    ("stop-empty", CMPL, cmpl(stop=[""]), 400, "stop"),
    ("stop-number", CMPL, cmpl(stop=3), 400, "stop"),
    ("stop_token_ids-2**80", CMPL, cmpl(stop_token_ids=[HUGE]), 400, "stop_token_ids"),
    ("stop_token_ids-negative", CMPL, cmpl(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("stop_token_ids-2000", CMPL, cmpl(stop_token_ids=list(range(2000))), 400, "stop_token_ids"),
    (
        "stop_token_ids-1024-negative",
        CMPL,
        cmpl(stop_token_ids=[-1] * 1024),
        400,
        "stop_token_ids",
    ),  # fmt: skip
    ("prompt-token-2**80", CMPL, cmpl(prompt=[1, HUGE]), 400, "prompt"),
    ("prompt-token-negative", CMPL, cmpl(prompt=[[1], [-1]]), 400, "prompt"),
    ("prompt-token-past-vocab", CMPL, cmpl(prompt=[1, 384]), 400, "prompt"),
    ("prompt-too-many-tokens", CMPL, cmpl(prompt=[7] * 600), 400, "prompt"),
    (
        "prompt-too-many-chars",
        CMPL,
        cmpl(prompt="ab" * (MAX_MODEL_LEN * MAX_CHARS_PER_TOKEN)),
        400,
        "prompt",
    ),  # fmt: skip
    ("prompt-empty", CMPL, cmpl(prompt=""), 400, "prompt"),
    ("prompt-empty-list", CMPL, cmpl(prompt=[]), 400, "prompt"),
    ("prompt-empty-ids", CMPL, cmpl(prompt=[[1, 2], []]), 400, "prompt"),
    ("prompt-empty-string-in-list", CMPL, cmpl(prompt=["a", ""]), 400, "prompt"),
    ("prompt-number", CMPL, cmpl(prompt=5), 400, "prompt"),
    ("prompt-object", CMPL, cmpl(prompt={"text": "hi"}), 400, "prompt"),
    ("prompt-mixed", CMPL, cmpl(prompt=[1, "a"]), 400, "prompt"),
    ("prompt-missing", CMPL, {"model": MODEL}, 400, "prompt"),
    ("temperature-string", CMPL, cmpl(temperature="0.5"), 400, "temperature"),
    ("n-float", CMPL, cmpl(n=1.5), 400, "n"),
    ("n-bool", CHAT, chat(n=True), 400, "n"),
    ("echo-string", CMPL, cmpl(echo="yes"), 400, "echo"),
    ("stream-string", CMPL, cmpl(stream="yes"), 400, "stream"),
    ("stream_options-without-stream", CMPL, cmpl(stream_options={}), 400, "stream_options"),
    ("suffix", CMPL, cmpl(suffix="x"), 400, "suffix"),
    ("logit_bias", CMPL, cmpl(logit_bias={"5": 1.0}), 400, "logit_bias"),
    ("tools", CHAT, chat(tools=[{"type": "function"}]), 400, "tools"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-string", CHAT, chat(messages="hi"), 400, "messages"),
    ("messages-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages"),
    (
        "messages-content-number",
        CHAT,
        chat(messages=[{"role": "user", "content": 3}]),
        400,
        "messages",
    ),  # fmt: skip
    (
        "messages-image",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages",
    ),  # fmt: skip
    (
        "messages-too-many-chars",
        CHAT,
        chat(messages=[{"role": "user", "content": "ab" * (MAX_MODEL_LEN * MAX_CHARS_PER_TOKEN)}]),
        400,
        "messages",
    ),  # fmt: skip
    ("model-unknown", CMPL, cmpl(model="gpt-4"), 404, "model"),
    ("model-huge-name", CHAT, chat(model="m" * 1_000_000), 404, "model"),
    ("model-number", CMPL, cmpl(model=7), 400, "model"),
    ("json-invalid", CMPL, b"{not json", 400, None),
    ("json-empty", CMPL, b"", 400, None),
    ("json-array", CMPL, b"[1, 2]", 400, None),
    ("json-lone-surrogate", CMPL, b'{"prompt": "\\ud800"}', 400, None),
    ("json-deep", CMPL, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("json-5000-digits", CMPL, b'{"prompt": "hi", "n": ' + b"9" * 5000 + b"}", 400, None),
]


@pytest.fixture(scope="module")
def base_url(backend):
    with serve(build_openai_app(backend, model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def assert_clean_error(r: httpx.Response, status: int, param: str | None) -> dict:
    error = assert_openai_error(r, status, param)
    assert not INTERNAL.search(r.text), r.text
    assert len(r.content) < 2000, "an error echoed the input"
    return error


def post(client: httpx.Client, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else raw(body)
    return client.post(path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, body, status, param", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_gets_a_clean_openai_error(client, engine, path, body, status, param):
    attempts = [body]
    if isinstance(body, dict) and "stream" not in body and "stream_options" not in body:
        attempts.append({**body, "stream": True})  # refused before any event is sent
    for attempt in attempts:
        start = time.monotonic()
        r = post(client, path, attempt)
        assert time.monotonic() - start < 5, "the refusal took more than 5 s"
        assert_clean_error(r, status, param)
    assert not engine.requests


@pytest.mark.parametrize("path, field", [(CMPL, "prompt"), (CHAT, "messages")])
def test_a_10_mb_prompt_is_refused_before_tokenizing(client, engine, path, field):
    text = "hello world " * (10_000_000 // 12)
    body = cmpl(prompt=text) if path == CMPL else chat(messages=[{"role": "user", "content": text}])
    start = time.monotonic()
    r = post(client, path, body)
    assert time.monotonic() - start < 2
    error = assert_clean_error(r, 400, field)
    assert "maximum context length is 512 tokens" in error["message"]
    assert not engine.requests


def test_a_body_over_the_limit_is_a_413(backend, engine):
    app = build_openai_app(backend, model_name=MODEL, max_request_body_bytes=4096, max_n=2)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for size in (5000, 100_000):  # drained and answered; too large to drain: answered
            r = post(client, CMPL, cmpl(prompt="x" * size))
            error = assert_clean_error(r, 413, None)
            assert "4096 bytes" in error["message"] and error["code"] == "request_too_large"
        error = assert_clean_error(post(client, CMPL, cmpl(n=3)), 400, "n")
        assert "at most 2" in error["message"]
        assert post(client, CMPL, cmpl(n=2, temperature=0.5)).status_code == 200
    assert not engine.requests


def test_extreme_but_valid_values_are_served(client, engine):
    for body in (
        cmpl(seed=2**63 - 1, n=4, temperature=0.7),
        cmpl(seed=-(2**63), top_k=2**62, temperature=1e300),
        cmpl(temperature=1e-300, top_p=1e-300, min_p=1.0, repetition_penalty=1e-300),
        cmpl(prompt="ab" * 200, max_tokens=2, stop=["x" * 256] * 16, stop_token_ids=[383] * 1024),
        cmpl(n=128, max_tokens=1, best_of=128),
        chat(seed=2**63 - 1, logprobs=True, top_logprobs=20),
    ):
        r = post(client, CMPL if "prompt" in body else CHAT, body)
        assert r.status_code == 200, (body, r.text)


@pytest.mark.anyio
async def test_the_server_serves_after_the_hostile_input(client, engine):
    for path, body in ((CMPL, cmpl(temperature=0)), (CHAT, chat(temperature=0))):
        r = post(client, path, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
    await wait_idle(engine)


# -- errors from the backend ----------------------------------------------------------------------


def ray_error(cause: Exception):
    """The exception a Ray Serve handle raises for `cause` raised in a replica (text included)."""
    import ray.exceptions as ray_exceptions

    try:
        raise cause
    except Exception:
        tb = traceback.format_exc()
    error = ray_exceptions.RayTaskError(
        "ServeReplica:pdray:Decode.handle_request_with_rejection", tb, cause,
        proctitle="ray::ServeReplica:pdray:Decode.handle_request_with_rejection()",
        pid=4242, ip="10.1.2.3",
    )  # fmt: skip
    return error.as_instanceof_cause()


def router_style(error: Exception) -> ValueError:
    """What deployments/router.py's _guard raises for a replica's user error today."""
    try:
        try:
            raise error
        except Exception as e:
            raise ValueError(str(e)) from None
    except ValueError as wrapped:
        return wrapped


class FailingBackend:
    """Fails `generate` with `error`, before any output or after `num_outputs` of them."""

    max_model_len = 64
    vocab_size = 100

    def __init__(self, error: Exception, num_outputs: int = 0, tokenizer=None):
        self.error, self.num_outputs, self._tokenizer = error, num_outputs, tokenizer

    async def generate(self, request_id, prompt, params):
        for i in range(self.num_outputs):
            c = CompletionOutput(0, "ab"[: i + 1], list(range(i + 1)))
            yield RequestOutput(request_id, None, list(prompt), [c], False)
        raise self.error

    async def abort(self, request_id: str) -> None:
        pass

    def tokenizer(self):
        assert self._tokenizer is not None, "token-id prompts need no tokenizer"
        return self._tokenizer


async def post_to(backend, body: dict) -> httpx.Response:
    app = build_openai_app(backend, model_name="fake")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(CMPL, json={"prompt": [1, 2], **body})


REPLICA_VALUE_ERROR = ValueError("Overflow when unpacking long long")


@pytest.mark.anyio
@pytest.mark.parametrize("wrap", [ray_error, lambda e: router_style(ray_error(e))])
async def test_a_replica_value_error_keeps_only_its_message(wrap, caplog):
    backend = FailingBackend(wrap(REPLICA_VALUE_ERROR))
    error = assert_clean_error(await post_to(backend, {}), 400, "any")
    assert error["message"] == "Overflow when unpacking long long"
    assert "pid=4242" in caplog.text  # the whole error is in the server's log
    r = await post_to(FailingBackend(wrap(REPLICA_VALUE_ERROR), num_outputs=2), {"stream": True})
    events = parse_sse(r.text)
    assert events[-1]["error"]["message"] == "Overflow when unpacking long long"
    assert not INTERNAL.search(r.text)


@pytest.mark.anyio
@pytest.mark.parametrize("num_outputs", [0, 2])
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("decode instance pdray#Decode#x1 (pid=7, ip=10.0.0.1) failed at 0x7f00aabbcc"),
        IndexError("list index out of range"),
        "ray-runtime-error",
    ],
)
async def test_unexpected_errors_are_generic_500s_logged_under_the_request_id(
    error, num_outputs, caplog
):
    if error == "ray-runtime-error":
        error = ray_error(RuntimeError("CUDA error at 0x7f1234567890"))
    caplog.set_level(logging.ERROR)
    backend = FailingBackend(error, num_outputs)
    r = await post_to(backend, {"stream": num_outputs > 0})
    if num_outputs:
        assert r.status_code == 200
        found = parse_sse(r.text)[-1]["error"]
        assert not INTERNAL.search(r.text)
    else:
        found = assert_clean_error(r, 500, None)
    assert found["type"] == "server_error"
    request_id = re.search(r"request id (cmpl-[0-9a-f]+)", found["message"]).group(1)
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and logged[0].exc_info is not None


@pytest.mark.anyio
async def test_no_capacity_keeps_a_clean_message_and_drops_an_internal_one():
    error = assert_clean_error(
        await post_to(FailingBackend(NoCapacityError("all full")), {}), 503, None
    )
    assert error["message"] == "all full"
    inner = ray_error(RuntimeError("actor died"))
    backend = FailingBackend(NoCapacityError(f"no instance could take the request: {inner}"))
    error = assert_clean_error(await post_to(backend, {}), 503, None)
    assert error["type"] == "service_unavailable_error" and "try again" in error["message"]
    outage = (
        "Redis unreachable for 3 s (Error 111 connecting to 10.0.0.7:6379. Connection refused.)"
    )
    backend = FailingBackend(NoCapacityError(f"no instance could take the request; {outage}"))
    error = assert_clean_error(await post_to(backend, {}), 503, None)
    assert "Redis unreachable for 3 s (Error 111 connecting to <address>." in error["message"]


@pytest.mark.anyio
async def test_a_request_timeout_is_a_504():
    error = RequestTimeoutError("request cmpl-1 did not finish within request_timeout_s=5 s")
    found = assert_clean_error(await post_to(FailingBackend(error), {}), 504, None)
    assert found["type"] == "timeout" and "request_timeout_s=5 s" in found["message"]
    r = await post_to(FailingBackend(error, num_outputs=2), {"stream": True})
    assert parse_sse(r.text)[-1]["error"]["type"] == "timeout"


class SlowTokenizer:
    def __init__(self):
        self.started = threading.Event()

    def encode(self, text: str, **_) -> list[int]:
        self.started.set()
        time.sleep(1.0)
        return [1, 2]


@pytest.mark.anyio
async def test_tokenizing_leaves_the_event_loop_free():
    tokenizer = SlowTokenizer()
    app = build_openai_app(
        FailingBackend(ValueError("refused"), tokenizer=tokenizer), model_name="m"
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        slow = asyncio.ensure_future(client.post(CMPL, json={"prompt": "a long text"}))
        await wait_until(tokenizer.started.is_set, 5, "tokenizing did not start")
        start = time.monotonic()
        assert (await client.get("/v1/models")).status_code == 200
        assert time.monotonic() - start < 0.5 and not slow.done()
        assert_clean_error(await slow, 400, None)
