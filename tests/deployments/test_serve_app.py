"""`serve run` on a copy of serve_config.yaml (tiny checkpoint, CPU, 2 prefill + 2 decode replicas
over UCX), driven over HTTP with the official openai client; its Ray metrics read from the node's
Prometheus endpoint; then a decode replica killed mid-run."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import redis
from ray import serve

pytest.importorskip("ucxx")
import prometheus_client  # noqa: F401 (a dependency the tests need: missing fails)
from serve_harness import (  # noqa: E402
    MAX_MODEL_LEN,
    StreamFailed,
    async_client,
    instance_records,
    kill_and_wait_dead,
    offline,
    replica_actor,
    run_app,
    settled_scrape,
    stream_text,
    wait_all_blocks_free,
)

from pdray import SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36]]
TTFT_COUNT = "ray_pdray_time_to_first_token_seconds_count"
REQUESTS = "ray_pdray_requests_total"
PICKS = "ray_pdray_routing_decisions_total"
KV_BYTES = "ray_pdray_kv_transfer_bytes_total"
SNAPSHOT_REFRESH_S = 1.0  # the router re-reads Redis every TTL / 4 (the harness's TTL is 3 s)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3", max_position_embeddings=MAX_MODEL_LEN)
    yield from run_app(path, tmp_path_factory.mktemp("serve"))


def test_greedy_completions_equal_offline_engine(server):
    client, model = server["client"], server["model"]
    want = offline(model, PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, expected in zip(PROMPTS, want, strict=True):
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.choices[0].text == expected.text
        assert out.usage.prompt_tokens == len(prompt)
        assert out.usage.completion_tokens == 12 == len(expected.token_ids)
        assert out.usage.total_tokens == len(prompt) + 12


def test_streamed_chat_equals_non_streamed(server):
    client, model = server["client"], server["model"]
    messages = [{"role": "user", "content": "hello there, how are you"}]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0
    )
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens
    # Where TTFT went (deployments/metrics.Span): the first token came from prefill, before
    # decode's second one; the instance spans fit inside the router's.
    spans = usage.model_extra["pdray_spans_s"]
    assert set(spans) == {"reserved", "first_token", "second_token", "prefill_queue",
                          "prefill_first_token", "decode_admitted"}  # fmt: skip
    assert 0 < spans["reserved"] < spans["first_token"] < spans["second_token"]
    assert 0 <= spans["prefill_queue"] < spans["prefill_first_token"] < spans["first_token"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": [1, 2], "max_tokens": -3}, 400),
        ({"prompt": [1, 999999], "max_tokens": 3}, 400),
        ({"prompt": list(range(5, 300)) * (MAX_MODEL_LEN // 295 + 1), "max_tokens": 3}, 400),
        ({"prompt": [1, 2], "temperature": "hot"}, 400),
        ({"prompt": [1, 2], "model": "not-this-one"}, 404),
    ],
)
def test_bad_input_gets_openai_errors(server, body, status):
    import httpx

    payload = {"model": server["model"], **body}
    r = httpx.post(f"{server['base_url']}/v1/completions", json=payload, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and "type" in error and "param" in error and "code" in error


def test_48_concurrent_requests_and_redis_records(server):
    async def main():
        base_url = f"{server['base_url']}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
            calls = [
                client.completions.create(model=server["model"], prompt=[5 + i, 6, 7], max_tokens=6)
                for i in range(48)
            ]
            return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    assert len(outs) == 48 and all(o.usage.completion_tokens >= 1 for o in outs)
    assert server["client"].completions.create(model=server["model"], prompt=[9, 9], max_tokens=2)
    keys = redis.Redis.from_url(server["redis_url"]).keys("pdray:*")
    assert len(keys) == 4  # one live record per engine replica (2 prefill, 2 decode)


def test_metrics_on_the_prometheus_endpoint(server):
    """The router's histograms count each request once; replicas export gauges and KV bytes."""
    client, model = server["client"], server["model"]
    names = (TTFT_COUNT, REQUESTS, PICKS)
    before = settled_scrape(server, *names, quiet_s=2.0)
    num_requests = 4
    for i in range(num_requests):  # each ends by length, streamed or not
        kwargs = {"max_tokens": 5, "extra_body": {"ignore_eos": True}, "stream": bool(i % 2)}
        out = client.completions.create(model=model, prompt=[40 + i, 41, 42], **kwargs)
        assert sum(1 for _ in out) if i % 2 else out.choices[0].finish_reason == "length"

    def counts(after) -> dict[str, float]:
        def grew(name: str, **labels: str) -> float:
            return after.value(name, **labels) - before.value(name, **labels)

        return {
            "ttft": grew(TTFT_COUNT),
            "tpot": grew("ray_pdray_time_per_output_token_seconds_count"),
            "e2e": grew("ray_pdray_e2e_request_latency_seconds_count"),
            "requests": grew(REQUESTS),
            "finished by length": grew(REQUESTS, status="length"),
            "prefill picks": grew(PICKS, role="prefill", outcome="picked"),
            "decode picks": grew(PICKS, role="decode", outcome="picked"),
        }

    deadline = time.time() + 30
    after = settled_scrape(server, *names)
    while min(counts(after).values()) < num_requests and time.time() < deadline:
        after = settled_scrape(server, *names)  # a late report
    assert counts(after) == dict.fromkeys(counts(after), num_requests)
    for role in ("prefill", "decode"):
        assert after.value(KV_BYTES, role=role) > 0
    assert after.value("ray_pdray_kv_transfers_total", role="decode") > 0
    replicas = set(instance_records(server))
    assert set(after.by("ray_pdray_kv_cache_usage", "replica")) >= replicas
    assert set(after.by("ray_pdray_running_requests", "replica")) >= replicas


def test_clients_that_leave_free_their_blocks(server):
    """Clients that stop reading long streams part-way: the router aborts their requests on
    decode, so every KV block is free again within seconds (not when the streams would end)."""
    model = server["model"]
    chunks: dict[int, int] = {}

    async def leave_after(aclient, i: int):
        def on_chunk(text: str) -> bool:
            chunks[i] = chunks.get(i, 0) + 1
            return chunks[i] >= 20

        return await stream_text(aclient, model, [60 + i, 6, 7], MAX_MODEL_LEN - 8, on_chunk)

    async def main():
        async with async_client(server) as aclient:
            return await asyncio.gather(*(leave_after(aclient, i) for i in range(8)))

    texts = asyncio.run(main())
    assert all(isinstance(t, str) and t for t in texts), texts
    wait_all_blocks_free(server, 5)


def test_decode_replica_killed_mid_run(server):
    """Requests spread over all four replicas. Then one decode replica's actor is killed while it
    streams some requests and waits for the KV of others: those without a token by then complete
    with the offline engine's output (the router retries them on the other decode replica); the
    ones it was streaming fail with an error naming it. Its record goes, it is never picked
    again, and no KV block stays taken."""
    model = server["model"]
    records = instance_records(server)
    decodes = sorted(i for i, r in records.items() if r["role"] == "decode")
    assert len(decodes) == 2 and len(records) == 4
    long_prompts = [[50 + i, 6, 7] for i in range(6)]
    long_tokens = MAX_MODEL_LEN - 8
    prompts = [[(7 * i + j) % 300 + 5 for j in range(200)] for i in range(20)]  # slow prefill
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.text for o in offline(model, prompts, params)]
    params = SamplingParams(temperature=0, max_tokens=long_tokens, ignore_eos=True)
    want_long = [o.text for o in offline(model, long_prompts, params)]
    first_chunk_s: dict[tuple[str, int], float] = {}
    stop_reading_s = {"long": float("inf")}  # then the client leaves (the server aborts)

    async def request(aclient, kind: str, i: int, prompt: list[int], max_tokens: int):
        def on_chunk(text: str) -> bool:
            first_chunk_s.setdefault((kind, i), time.monotonic())
            return time.monotonic() > stop_reading_s.get(kind, float("inf"))

        return await stream_text(aclient, model, prompt, max_tokens, on_chunk)

    async def together(kind: str, prompts_: list[list[int]]) -> list:
        async with async_client(server) as aclient:
            calls = [request(aclient, kind, i, p, 16) for i, p in enumerate(prompts_)]
            return await asyncio.gather(*calls)

    assert asyncio.run(together("spread", prompts[:16])) == want[:16]
    moved = settled_scrape(server, KV_BYTES, quiet_s=2.5).by(KV_BYTES, "replica")
    assert all(moved.get(i, 0) > 0 for i in records), moved  # every replica served some

    async def streaming(kind: str, count: int) -> None:
        deadline = time.monotonic() + 60
        while sum(k[0] == kind for k in first_chunk_s) < count:
            assert time.monotonic() < deadline, f"{kind} requests do not stream"
            await asyncio.sleep(0.01)

    async def running_in_redis(count: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            records = instance_records(server).values()
            if sum(r["running_requests"] for r in records if r["role"] == "decode") >= count:
                return
            assert time.monotonic() < deadline, f"records never showed {count} running: {records}"
            await asyncio.sleep(0.05)

    async def main():
        async with async_client(server) as aclient:
            return await kill_mid_run(aclient)

    async def kill_mid_run(aclient):
        decode = serve.get_deployment_handle("Decode", app_name="pdray")

        async def stats() -> dict[str, dict]:
            return {d: await decode.stats.remote(replica_id=d) for d in decodes}

        def start(kind: str, indices, prompts_, max_tokens: int) -> list[asyncio.Future]:
            return [
                asyncio.ensure_future(request(aclient, kind, i, prompts_[i], max_tokens))
                for i in indices
            ]

        # long streams on both decode replicas: the router sees the first three's load (after a
        # heartbeat and a snapshot refresh) before it places the next three
        longs = start("long", range(3), long_prompts, long_tokens)
        await streaming("long", 3)
        await running_in_redis(3)  # a heartbeat carried the load to Redis,
        await asyncio.sleep(SNAPSHOT_REFRESH_S)  # and the router's snapshot read it since
        longs += start("long", range(3, 6), long_prompts, long_tokens)
        await streaming("long", 6)
        assert all(s["running_requests"] >= 1 for s in (await stats()).values())
        # then requests with long prompts; the victim is a decode replica waiting for their KV
        shorts = start("short", range(len(prompts)), prompts, 16)
        victim, deadline = None, time.monotonic() + 30
        while victim is None:
            assert time.monotonic() < deadline, "no decode replica waits for KV"
            waiting = {d: s["waiting_requests"] for d, s in (await stats()).items()}
            victim = next((d for d, n in waiting.items() if n >= 2), None)
        actor, _ = replica_actor(f"#{victim}")
        await kill_and_wait_dead(actor)
        dead_s = time.monotonic()
        stop_reading_s["long"] = dead_s + 2.0  # the survivor's streams need not run to the end
        return victim, dead_s, await asyncio.gather(*longs), await asyncio.gather(*shorts)

    victim, dead_s, longs, shorts = asyncio.run(main())
    # the client is told a server error and the request id, never the replica (logged there)
    died = "internal server error; the server logged it under request id"
    assert any(isinstance(r, StreamFailed) for r in longs)  # the victim was streaming some
    for i, result in enumerate(longs):
        if isinstance(result, StreamFailed):
            assert died in str(result.error)
            # what reached the client before the error is the right text, nothing repeated
            assert result.text and want_long[i].startswith(result.text), (i, result.text)
        else:  # streamed by the other decode replica, correct so far
            assert result and want_long[i].startswith(result), f"long request {i}: {result!r}"
    for i, result in enumerate(shorts):
        streamed_before_death = first_chunk_s.get(("short", i), dead_s + 2) < dead_s + 1
        if isinstance(result, StreamFailed) and streamed_before_death:
            assert died in str(result.error)
            assert want[i].startswith(result.text), (i, result.text)
        else:  # retried on the other decode replica: complete, the first token not repeated
            assert result == want[i], f"request {i}: {result!r}"
    # the victim's record is gone (deleted when marked down, else expired after the TTL)
    deadline = time.time() + 3 + 5
    while victim in instance_records(server) and time.time() < deadline:
        time.sleep(0.2)
    assert victim not in instance_records(server)
    # calls to the victim that failed, less the requests that failed: requests it held with no
    # token yet, which the router moved to the other decode replica
    picks = settled_scrape(server, PICKS)
    failed_calls = picks.value(PICKS, replica=victim, outcome="failed")
    assert failed_calls > sum(isinstance(r, StreamFailed) for r in longs + shorts)

    assert asyncio.run(together("more", prompts[:4])) == want[:4]
    later = settled_scrape(server, PICKS)
    assert later.value(PICKS, replica=victim) == picks.value(PICKS, replica=victim)
    assert (
        later.value(PICKS, role="decode", outcome="picked")
        >= picks.value(PICKS, role="decode", outcome="picked") + 4
    )

    # every KV block taken during all this is free again on the replicas still serving
    wait_all_blocks_free(server, 10)
