"""Tensor parallelism on CPU (gloo): greedy outputs with TP=2 equal TP=1, including a model with
fewer KV heads than ranks (its KV heads are replicated); no block is leaked.

On GPUs: `PDRAY_TP_TEST_DEVICE=cuda python -m pytest tests/test_tensor_parallel.py -k tp2_equals`
runs the parity cases on CUDA (NCCL with two GPUs, CUDA graphs on; with one GPU both ranks share
it over gloo: tensor_parallel_backend="gloo", no CUDA graphs)."""

from __future__ import annotations

import os

import pytest
import torch
from test_parity import assert_no_leak, greedy, make_prompts, new_llm

from pdray import LLM

DEVICE = os.environ.get("PDRAY_TP_TEST_DEVICE", "cpu")

CASES = {
    "llama3": {},
    "qwen2": {},  # QKV bias
    "qwen3": {},  # per-head q/k norms
    "llama3-one-kv-head": {"num_key_value_heads": 1},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_equals_tp1(checkpoint, case):
    family = case.split("-")[0]
    path = checkpoint(family, **CASES[case])
    prompts = make_prompts(seed=7)
    engine = {"device": DEVICE, "dtype": "float32", "block_size": 4}
    if DEVICE != "cpu":
        engine.update(block_size=16, num_kv_blocks=256)
        if torch.cuda.device_count() < 2:  # NCCL refuses two ranks on one GPU
            engine["tensor_parallel_backend"] = "gloo"
    expected = greedy(LLM(str(path), **engine), prompts)
    with LLM(str(path), tensor_parallel_size=2, max_num_batched_tokens=64, **engine) as llm:
        assert greedy(llm, prompts) == expected
        assert_no_leak(llm)


def test_tp_size_must_divide_heads(checkpoint):
    path = checkpoint("llama3")  # 4 attention heads
    with pytest.raises(Exception, match="attention heads"):
        new_llm(path, tensor_parallel_size=3)


def test_followers_are_actors_in_the_replicas_placement_group(checkpoint):
    """Under Ray (as in a Serve replica with placement_group_bundles), rank 0 is the caller in
    bundle 0 and each other rank a Ray actor in its own bundle."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    path = checkpoint("llama3", num_key_value_heads=1)
    prompts = make_prompts(seed=3)
    expected = greedy(new_llm(path), prompts)

    @ray.remote(num_cpus=1)
    class Replica:
        def run(self, path: str, prompts):
            import test_parity

            with test_parity.new_llm(path, tensor_parallel_size=2) as llm:
                kinds = [type(f).__name__ for f in llm.engine.runner.tp_group.followers]
                return kinds, test_parity.greedy(llm, prompts)

    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": tests_dir}}
    )
    try:
        group = placement_group([{"CPU": 1}, {"CPU": 1}])
        ray.get(group.ready(), timeout=60)
        strategy = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        replica = Replica.options(scheduling_strategy=strategy).remote()
        kinds, outputs = ray.get(replica.run.remote(str(path), prompts), timeout=240)
    finally:
        ray.shutdown()
    assert kinds == ["_ActorFollower"]
    assert outputs == expected


@pytest.mark.timeout(120)
def test_dead_follower_is_reported_and_stops_the_engine(checkpoint):
    """A follower that exits shows in `dead()` (a Serve replica's health check raises on it, so
    Serve replaces the replica) and the next step fails with its rank and how it ended."""
    path = checkpoint("llama3")
    with new_llm(path, tensor_parallel_size=2) as llm:
        group = llm.engine.runner.tp_group
        assert group.dead() == []
        follower = group.followers[0]
        follower.process.kill()
        follower.process.wait(10)
        assert group.dead() == ["tensor-parallel rank 1 (process)"]
        with pytest.raises(RuntimeError, match=r"rank 1 \(process\) was killed by SIGKILL"):
            greedy(llm, make_prompts(seed=1))


def test_dummy_weights_do_not_depend_on_the_tensor_parallel_size():
    """`dummy:` weights are drawn unsharded and sliced like a checkpoint, so a prefill engine
    and a decode engine of different TP sizes run the same model."""
    prompts = make_prompts(seed=2, vocab_size=256)
    expected = greedy(new_llm("dummy:tiny", num_kv_blocks=128), prompts)
    with new_llm("dummy:tiny", num_kv_blocks=128, tensor_parallel_size=2) as llm:
        assert greedy(llm, prompts) == expected
