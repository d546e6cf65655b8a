"""`serve run` with mixed replicas only (`prefill` and `decode` at 0 replicas, `mixed` at 2; the
colocated baseline of docs/performance.md, README's `mixed` role): completions equal the offline
engine's, every block comes back."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("openai")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("ucxx")

from serve_harness import MAX_MODEL_LEN, instance_records, run_app  # noqa: E402

from pdray import LLM, SamplingParams  # noqa: E402

PROMPTS = [[5, 6, 7, 8], list(range(20, 60)), list(range(100, 103)), [9] * 30]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3", max_position_embeddings=MAX_MODEL_LEN)
    yield from run_app(path, tmp_path_factory.mktemp("serve-mixed"), mixed=2)


def test_mixed_replicas_serve_alone(server):
    client, model = server["client"], server["model"]
    records = instance_records(server)
    assert sorted(r["role"] for r in records.values()) == ["mixed", "mixed"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = LLM(model, device="cpu", dtype="float32").generate(PROMPTS, params, use_tqdm=False)
    for prompt, expected in zip(PROMPTS, want, strict=True):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].text == expected.outputs[0].text
    stream = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == want[1].outputs[0].text
    deadline = time.time() + 10
    while time.time() < deadline:  # a heartbeat shows every block free again
        records = instance_records(server)
        if all(r["free_kv_blocks"] == r["total_kv_blocks"] for r in records.values()):
            break
        time.sleep(0.2)
    assert all(r["free_kv_blocks"] == r["total_kv_blocks"] for r in records.values()), records
