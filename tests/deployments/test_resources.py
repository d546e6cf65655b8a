"""Ray resources of a replica: one placement-group bundle per tensor-parallel rank."""

from __future__ import annotations

import pytest
from pdray.deployments.app import REPLICA_ENV, parse_args, replica_resources


def test_tensor_parallel_replica_gets_a_bundle_per_rank():
    args = parse_args({"prefill": {"replicas": 0}, "decode": {"replicas": 0},
                       "mixed": {"replicas": 1, "tensor_parallel_size": 4}})  # fmt: skip
    options, bundles = replica_resources(args.mixed, on_gpu=True)
    env = {"env_vars": REPLICA_ENV}
    assert options == {"num_cpus": 0.5, "num_gpus": 1, "runtime_env": env}
    assert bundles == [{"CPU": 0.5, "GPU": 1}] + [{"GPU": 1}] * 3
    options, bundles = replica_resources(args.mixed, on_gpu=False)
    assert options["num_gpus"] == 0 and len(bundles) == 4 and bundles[0] == {"CPU": 0.5}


def test_single_rank_replica_has_a_group_of_one():
    args = parse_args({})
    options, bundles = replica_resources(args.prefill, on_gpu=True)
    assert options == {"num_cpus": 0.5, "num_gpus": 0.5, "runtime_env": {"env_vars": REPLICA_ENV}}
    assert bundles == [{"CPU": 0.5, "GPU": 0.5}]


def test_prefill_and_decode_take_different_tensor_parallel_sizes():
    args = parse_args(
        {"prefill": {"tensor_parallel_size": 2}, "decode": {"tensor_parallel_size": 1}}
    )
    assert len(replica_resources(args.prefill, on_gpu=True)[1]) == 2
    assert len(replica_resources(args.decode, on_gpu=True)[1]) == 1
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        parse_args({"decode": {"tensor_parallel_size": 0}})
