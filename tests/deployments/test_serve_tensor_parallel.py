"""`serve run` with tensor-parallel prefill and decode replicas (CPU, gloo, UCX): each replica's
other rank is a Ray actor in its placement group, sending or receiving the KV of its own heads.
Greedy completions equal the offline TP=1 engine's; every block comes back."""

from __future__ import annotations

import os
import signal
import time

import openai  # noqa: F401 (a dependency the tests need: missing fails)
import pytest
import ray
import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)

pytest.importorskip("ucxx")

from serve_harness import (  # noqa: E402
    MAX_MODEL_LEN,
    assert_completions_equal_offline,
    run_app,
    wait_all_blocks_free,
)

from pdray import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8], list(range(20, 90)), list(range(100, 103))]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3", max_position_embeddings=MAX_MODEL_LEN)  # 2 KV heads: 1 per rank
    yield from run_app(path, tmp_path_factory.mktemp("serve-tp"), replicas=1,
                       tensor_parallel=(2, 2))  # fmt: skip


def test_tensor_parallel_prefill_and_decode_equal_offline(server):
    assert_completions_equal_offline(server, PROMPTS, max_tokens=10)
    wait_all_blocks_free(server)
    # each replica drives one follower actor (its rank 1)
    from ray._private.state import actors  # from the GCS: the harness runs no dashboard

    ranks = [a for a in actors().values() if a["ActorClassName"].endswith("_RankActor")]
    assert sum(a["State"] == "ALIVE" for a in ranks) == 2, ranks


def _rank_actors() -> list[dict]:
    from ray._private.state import actors  # from the GCS: the harness runs no dashboard

    return [a for a in actors().values() if a["ActorClassName"].endswith("_RankActor")]


@pytest.mark.timeout(400)
def test_killed_follower_replica_is_replaced_then_the_app_shuts_down(server):
    """A follower actor's process killed: its replica's health check fails, Serve replaces the
    replica (closing the old one does not wait on the dead rank) and the app serves again; then
    `serve run` stops within a deadline and leaves no rank actor behind. Runs last here: it
    stops the module's app."""
    client, model = server["client"], server["model"]
    alive = [a for a in _rank_actors() if a["State"] == "ALIVE"]
    assert len(alive) == 2, alive
    victim = alive[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(model, device="cpu", dtype="float32").generate(PROMPTS[:1], params, use_tqdm=False)
    deadline = time.time() + 180
    while time.time() < deadline:
        ranks = [a for a in _rank_actors() if a["State"] == "ALIVE"]
        if len(ranks) == 2 and victim["ActorID"] not in {a["ActorID"] for a in ranks}:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the replica of the killed rank was not replaced: {_rank_actors()}")
    deadline = time.time() + 60  # the new replica answers once it is up
    while True:
        try:
            out = client.completions.create(
                model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True}, timeout=30,
            )  # fmt: skip
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)
    assert out.choices[0].text == want[0].outputs[0].text
    proc = server["serve_run"]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=90)  # raises TimeoutExpired (the test fails) if shutdown hangs
    deadline = time.time() + 30
    while any(a["State"] == "ALIVE" for a in _rank_actors()) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(a["State"] == "ALIVE" for a in _rank_actors()), _rank_actors()
