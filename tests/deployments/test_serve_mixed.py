"""`serve run` with mixed replicas only (`prefill` and `decode` at 0 replicas, `mixed` at 2; the
colocated baseline of docs/performance.md, README's `mixed` role): completions equal the offline
engine's, every block comes back."""

from __future__ import annotations

import openai  # noqa: F401 (a dependency the tests need: missing fails)
import pytest
import ray
import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)

pytest.importorskip("ucxx")

from serve_harness import (  # noqa: E402
    MAX_MODEL_LEN,
    assert_completions_equal_offline,
    instance_records,
    run_app,
    wait_all_blocks_free,
)

PROMPTS = [[5, 6, 7, 8], list(range(20, 60)), list(range(100, 103)), [9] * 30]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3", max_position_embeddings=MAX_MODEL_LEN)
    yield from run_app(path, tmp_path_factory.mktemp("serve-mixed"), mixed=2)


def test_mixed_replicas_serve_alone(server):
    client, model = server["client"], server["model"]
    records = instance_records(server)
    assert sorted(r["role"] for r in records.values()) == ["mixed", "mixed"]
    want = assert_completions_equal_offline(server, PROMPTS, max_tokens=10)
    stream = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == want[1]
    wait_all_blocks_free(server)
