"""Client side of the serving benchmark: arrivals, streaming requests, and the run loop.

A run: every request gets an arrival time (gamma-distributed gaps, or all at 0 for an infinite
rate); at its arrival it waits for a free slot (--max-concurrency), is sent with `stream: true`
and `stream_options.include_usage`, and its server-sent events are read until `[DONE]`, timing
each chunk that carries text. The run's wall time is from the first arrival to the last response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdray.bench.serve_datasets import SampleRequest
from pdray.bench.serve_metrics import RequestResult

try:
    import httpx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the serving benchmark needs httpx: pip install 'pdray[bench]'") from e


def check_arrival_params(request_rate: float, burstiness: float) -> None:
    if not request_rate > 0:
        raise ValueError(f"request rates must be > 0 (or inf), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness must be a finite number > 0, got {burstiness}")


def arrival_times_s(
    num: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """Send times of `num` requests from 0: gaps drawn from a gamma distribution with shape
    `burstiness` and mean 1 / `request_rate` (burstiness 1 is a Poisson process; below 1 is
    burstier, above 1 more even); an infinite rate sends everything at 0."""
    check_arrival_params(request_rate, burstiness)
    if math.isinf(request_rate):
        return np.zeros(num)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event in `lines` (a line iterator without line ends).

    Follows the SSE format: events end at a blank line; `data:` lines of one event are joined
    with newlines (one optional space after the colon is dropped); comments (`:`) and other
    fields are ignored; an event left unterminated at the end of the stream still counts.
    """
    data: list[str] = []
    async for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


@dataclass(slots=True)
class Endpoint:
    """Where and how requests are sent: an OpenAI completions or chat completions URL."""

    url: str
    model: str
    chat: bool = False
    api_key: str | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    def payload(self, request: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            if not isinstance(request.prompt, str):
                raise ValueError("chat completions take text prompts; use --prompt-type text")
            body["messages"] = [{"role": "user", "content": request.prompt}]
            body["max_completion_tokens"] = request.expected_output_len
        else:
            body["prompt"] = request.prompt
            body["max_tokens"] = request.expected_output_len
        if self.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra_body}

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _chunk_text(event: dict[str, Any], chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, request: SampleRequest
) -> RequestResult:
    """Send one streaming request and time it; a failure is recorded in the result, never raised
    (cancellation still propagates)."""
    result = RequestResult(prompt_len=request.prompt_len)
    try:
        await _stream(client, endpoint, request, result)
    except Exception as e:  # transport errors, timeouts, malformed events: this request failed
        result.error = f"{type(e).__name__}: {e}"
    result.success = not result.error
    return result


async def _stream(
    client: httpx.AsyncClient, endpoint: Endpoint, request: SampleRequest, result: RequestResult
) -> None:
    num_chunks = 0
    usage: dict[str, Any] = {}
    start = last = time.perf_counter()
    payload = endpoint.payload(request)
    async with client.stream("POST", endpoint.url, json=payload, headers=endpoint.headers()) as r:
        if r.status_code != 200:
            result.error = f"HTTP {r.status_code}: {_error_message(await r.aread())}"
            return
        async for data in sse_data(r.aiter_lines()):
            if data.strip() == "[DONE]":
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError(f"not a JSON object: {data[:200]}")
            if "error" in event:
                result.error = f"error event: {_error_message(data.encode())}"
                return
            usage = event.get("usage") or usage
            text = _chunk_text(event, endpoint.chat)
            if not text:
                continue
            now = time.perf_counter()
            if num_chunks == 0:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now
            num_chunks += 1
            result.generated_text += text
        else:
            result.error = "the stream ended before [DONE]"
            return
    if num_chunks == 0:  # tokens without visible text: they all "arrived" at the end
        last = time.perf_counter()
        result.ttft_s = last - start
    result.latency_s = last - start
    output_tokens, prompt_tokens = usage.get("completion_tokens"), usage.get("prompt_tokens")
    result.output_tokens = num_chunks if output_tokens is None else int(output_tokens)
    result.spans_s = usage.get("pdray_spans_s") or {}
    result.prompt_len = request.prompt_len if prompt_tokens is None else int(prompt_tokens)


def make_client(timeout_s: float) -> httpx.AsyncClient:
    """No connection limit (concurrency is the benchmark's to set) and no proxies from the
    environment (a proxy would be measured too)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False)


async def run_requests(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    requests: Sequence[SampleRequest],
    arrivals_s: Sequence[float],
    *,
    max_concurrency: int | None = None,
    progress: Any = None,
) -> tuple[list[RequestResult], float]:
    """Send `requests[i]` at `arrivals_s[i]` from now, at most `max_concurrency` at a time.
    Returns the results in request order and the wall time in seconds."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(request: SampleRequest, arrival_s: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + arrival_s - time.perf_counter()))
        async with slots or contextlib.nullcontext():
            result = await send_request(client, endpoint, request)
        if progress is not None:
            progress.update(1)
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, arrivals_s, strict=True)))
    return list(results), time.perf_counter() - start


async def fetch_models(
    client: httpx.AsyncClient, models_url: str, api_key: str | None, timeout_s: float
) -> list[dict[str, Any]]:
    """The `data` of GET /v1/models, retried each second until `timeout_s` (0: one attempt)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = await client.get(models_url, headers=headers)
            response.raise_for_status()
            return list(response.json().get("data") or [])
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"GET {models_url} failed: {type(e).__name__}: {e}") from e
        await asyncio.sleep(1.0)
