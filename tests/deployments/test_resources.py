"""Ray resources of a replica: one placement-group bundle per tensor-parallel rank."""

from __future__ import annotations

import pytest

from deployments.app import parse_args, replica_resources


def test_tensor_parallel_replica_gets_a_bundle_per_rank():
    args = parse_args({"prefill": {"replicas": 0}, "decode": {"replicas": 0},
                       "mixed": {"replicas": 1, "tensor_parallel_size": 4}})  # fmt: skip
    options, bundles = replica_resources(args.mixed, on_gpu=True)
    assert options == {"num_cpus": 0.5, "num_gpus": 1}
    assert bundles == [{"CPU": 0.5, "GPU": 1}] + [{"GPU": 1}] * 3
    options, bundles = replica_resources(args.mixed, on_gpu=False)
    assert options["num_gpus"] == 0 and len(bundles) == 4 and bundles[0] == {"CPU": 0.5}


def test_single_rank_replica_has_no_placement_group():
    args = parse_args({})
    options, bundles = replica_resources(args.prefill, on_gpu=True)
    assert options == {"num_cpus": 0.5, "num_gpus": 0.5} and bundles is None


def test_tensor_parallel_prefill_or_decode_is_refused_at_start():
    with pytest.raises(ValueError, match="prefill.tensor_parallel_size > 1 is not supported"):
        parse_args({"prefill": {"replicas": 1, "tensor_parallel_size": 2}})
