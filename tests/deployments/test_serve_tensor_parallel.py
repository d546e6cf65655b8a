"""`serve run` with tensor-parallel prefill and decode replicas (CPU, gloo, UCX): each replica's
other rank is a Ray actor in its placement group, sending or receiving the KV of its own heads.
Greedy completions equal the offline TP=1 engine's; every block comes back."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("openai")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("ucxx")

from serve_harness import MAX_MODEL_LEN, instance_records, run_app  # noqa: E402

from pdray import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8], list(range(20, 90)), list(range(100, 103))]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3", max_position_embeddings=MAX_MODEL_LEN)  # 2 KV heads: 1 per rank
    yield from run_app(path, tmp_path_factory.mktemp("serve-tp"), replicas=1,
                       tensor_parallel=(2, 2))  # fmt: skip


def test_tensor_parallel_prefill_and_decode_equal_offline(server):
    client, model = server["client"], server["model"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = LLM(model, device="cpu", dtype="float32").generate(PROMPTS, params, use_tqdm=False)
    for prompt, expected in zip(PROMPTS, want, strict=True):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].text == expected.outputs[0].text
    deadline = time.time() + 10
    while time.time() < deadline:  # the next heartbeat shows every block free again
        records = instance_records(server).values()
        if all(r["free_kv_blocks"] == r["total_kv_blocks"] for r in records):
            break
        time.sleep(0.2)
    assert all(r["free_kv_blocks"] == r["total_kv_blocks"] for r in records), records
    # each replica drives one follower actor (its rank 1)
    from ray._private.state import actors  # from the GCS: the harness runs no dashboard

    ranks = [a for a in actors().values() if a["ActorClassName"].endswith("_RankActor")]
    assert sum(a["State"] == "ALIVE" for a in ranks) == 2, ranks
