"""Faults under `serve run` (2 prefill + 2 decode replicas over UCX, tests/deployments/
serve_harness.py): a prefill replica killed while requests stream, and the ingress (Router)
replica killed, idle and mid-stream. Every request ends within a deadline, the client sees the
right text or a clear error, and every KV block comes back on the replicas still serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import redis  # noqa: F401 (a dependency the tests need: missing fails)
from ray import serve

pytest.importorskip("ucxx")
import prometheus_client  # noqa: F401 (a dependency the tests need: missing fails)
from serve_harness import (  # noqa: E402
    MAX_MODEL_LEN,
    StreamFailed,
    async_client,
    instance_records,
    kill_and_wait_dead,
    offline_texts,
    replica_actor,
    run_app,
    stream_text,
    wait_all_blocks_free,
)

APP_NAME = "pdray"
ROUTER = "Router"  # deployments/app.py names the ingress deployment so
TTL_S = 3  # the harness's scheduler_ttl_s: a dead replica's record is gone after it
LEASE_S = 5  # the harness's lease_s: decode recomputes a prompt whose KV did not come by then
ROUTER_RESTART_S = 180  # Serve replaces a dead Router replica (about 20-60 s on 2 busy cores)
STREAM_END_S = 30  # a client's stream ends after its router replica died
ORPHAN_END_S = 180  # a request of MAX_MODEL_LEN tokens decodes to its end (15-40 s here)
# the client is told a server error and the request id, never a replica or deployment
DIED = "internal server error; the server logged it under request id"
INTERNAL_WORDS = ("Prefill", "Decode", "Router", "replica", "Ray", "Traceback", "actor")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3", max_position_embeddings=MAX_MODEL_LEN)
    yield from run_app(path, tmp_path_factory.mktemp("serve-faults"), replicas=2)


def assert_clear_error(error: Exception) -> None:
    message = str(error)
    assert DIED in message, message
    assert not any(word in message for word in INTERNAL_WORDS), message


@pytest.mark.timeout(400)
def test_prefill_replica_killed_while_requests_stream(server):
    """Streamed requests with long prompts spread over both prefill replicas; one prefill replica
    is killed while it still has prompts queued. A request whose KV never comes is recomputed by
    its decode replica after the lease (policy `recompute`), so every request ends with the
    offline engine's output, or at worst a clear error after a right prefix; the victim's record
    goes, later requests succeed, and every block is free again on the replicas serving."""
    model = server["model"]
    records = instance_records(server)
    prefills = sorted(i for i, r in records.items() if r["role"] == "prefill")
    assert len(prefills) == 2 and len(records) == 4, records
    prompts = [[(11 * i + j) % 300 + 5 for j in range(400)] for i in range(24)]  # slow prefill
    want = offline_texts(model, prompts, 16)
    first_chunk_s: dict[int, float] = {}
    num_just_after = 4  # requests started once the victim is dead

    def first_chunk(i: int):
        def note(_text: str) -> bool:
            first_chunk_s.setdefault(i, time.monotonic())
            return False  # keep reading (True would make the client leave)

        return note

    async def main():
        prefill = serve.get_deployment_handle("Prefill", app_name=APP_NAME)
        async with async_client(server) as aclient:
            calls = [
                asyncio.ensure_future(stream_text(aclient, model, p, 16, first_chunk(i)))
                for i, p in enumerate(prompts)
            ]
            # the victim: a prefill replica with prompts still queued, after some first tokens
            victim, deadline = None, time.monotonic() + 60
            while victim is None:
                assert time.monotonic() < deadline, "no prefill replica has prompts queued"
                stats = {p: await prefill.stats.remote(replica_id=p) for p in prefills}
                queued = {p: s["queued_prefill_tokens"] for p, s in stats.items()}
                if first_chunk_s:
                    victim = next((p for p, n in queued.items() if n >= 3 * len(prompts[0])), None)
                await asyncio.sleep(0.01)
            actor, _ = replica_actor(victim)
            await kill_and_wait_dead(actor)
            dead_s = time.monotonic()
            # placed before the victim's record expires: the router may still pick it
            calls += [
                asyncio.ensure_future(stream_text(aclient, model, p, 16))
                for p in prompts[:num_just_after]
            ]
            ends_s = 60 + 2 * LEASE_S
            try:
                results = await asyncio.wait_for(asyncio.gather(*calls), ends_s)
            except asyncio.TimeoutError:
                pending = [i for i, c in enumerate(calls) if not c.done()]
                raise AssertionError(
                    f"requests {pending} did not end within {ends_s} s of the kill"
                ) from None
            return victim, dead_s, results

    victim, dead_s, results = asyncio.run(main())
    results, just_after = results[: len(prompts)], results[len(prompts) :]
    assert just_after == want[:num_just_after], just_after
    started_before = sum(s < dead_s for s in first_chunk_s.values())
    assert 0 < started_before < len(prompts), "the kill should fall between first tokens"
    failed = [i for i, r in enumerate(results) if isinstance(r, StreamFailed)]
    for i, result in enumerate(results):
        if isinstance(result, StreamFailed):
            assert_clear_error(result.error)
            # what reached the client before the error is the right text, nothing repeated
            assert want[i].startswith(result.text), (i, result.text, want[i])
        else:
            assert result == want[i], f"request {i}: {result!r} != {want[i]!r}"
    print(f"killed {victim}; {started_before} requests streamed before; failed: {failed}")

    # the victim's record is gone (it stopped heartbeating: expired after the TTL)
    deadline = time.time() + TTL_S + 10
    while victim in instance_records(server):
        assert time.time() < deadline, f"the killed prefill {victim}'s record stays in Redis"
        time.sleep(0.2)

    async def later():
        async with async_client(server) as aclient:
            return await asyncio.gather(*(stream_text(aclient, model, p, 16) for p in prompts[:4]))

    assert asyncio.run(later()) == want[:4]
    assert victim not in instance_records(server)
    wait_all_blocks_free(server, 30, replicas=set(records) - {victim})


@pytest.mark.timeout(600)
def test_router_replica_restarted(server):
    """The Router replica killed while idle: Serve starts a new one, which rebuilds its snapshot
    from Redis and serves the offline engine's completions. Killed while a request streams: the
    client's stream ends at once with a connection error after a right prefix, and every block
    comes back on the engines. They come back only when the orphaned request ends by itself
    (max_tokens): Ray does not cancel a streaming call whose caller actor died, so the engines
    never learn that the router went away (ORPHAN_END_S bounds that run on a slow machine)."""
    client, model = server["client"], server["model"]
    deadline = time.time() + ROUTER_RESTART_S  # test 1's replacement prefill may be starting
    while len(engines := set(instance_records(server))) < 4:
        assert time.time() < deadline, f"only {engines} of 4 engine replicas have records"
        time.sleep(0.5)
    prompt = [5, 6, 7, 8, 9, 10]
    want = offline_texts(model, [prompt], 12)[0]

    def completes_again(timeout_s: float) -> str:
        deadline, last = time.time() + timeout_s, None
        while time.time() < deadline:
            try:
                out = client.with_options(timeout=20).completions.create(
                    model=model, prompt=prompt, max_tokens=12, temperature=0,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                return out.choices[0].text
            except openai.APIError as e:  # no router replica yet: the proxy answers 5xx
                last = e
                time.sleep(0.5)
        raise AssertionError(f"no completion within {timeout_s} s of the router's death: {last!r}")

    # idle
    actor, name = replica_actor(f"#{ROUTER}#")
    asyncio.run(kill_and_wait_dead(actor))
    assert completes_again(ROUTER_RESTART_S) == want
    _, new_name = replica_actor(f"#{ROUTER}#")
    assert new_name != name, "the completion came from the killed router"

    # mid-stream: a long stream, killed once it has streamed a while
    long_prompt = [50, 6, 7]
    max_tokens = MAX_MODEL_LEN - 8
    streamed = {"text": ""}
    dead_s = {}

    async def main():
        async with async_client(server, timeout_s=60) as aclient:
            call = asyncio.ensure_future(
                stream_text(aclient, model, long_prompt, max_tokens,
                            lambda text: streamed.__setitem__("text", text))
            )  # fmt: skip
            deadline = time.monotonic() + 60
            while len(streamed["text"]) < 20:
                assert time.monotonic() < deadline, "the long request does not stream"
                assert not call.done(), call.result()
                await asyncio.sleep(0.01)
            actor, _ = replica_actor(f"#{ROUTER}#")
            await kill_and_wait_dead(actor)
            dead_s["router"] = time.monotonic()
            try:
                return await asyncio.wait_for(call, STREAM_END_S)
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"the client's stream did not end within {STREAM_END_S} s of the router's death"
                ) from None

    result = asyncio.run(main())
    assert isinstance(result, StreamFailed), f"the stream ended without an error: {result!r}"
    assert isinstance(result.error, (openai.APIConnectionError, httpx.TransportError)), result
    want_long = offline_texts(model, [long_prompt], max_tokens)[0]
    assert result.text and want_long.startswith(result.text), result.text
    wait_all_blocks_free(server, ORPHAN_END_S, replicas=engines)
    print(f"blocks free {time.monotonic() - dead_s['router']:.1f} s after the router died")
    assert completes_again(ROUTER_RESTART_S) == want
