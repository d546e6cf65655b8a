"""The Serve app's arguments: a misspelt key fails at start naming it (top level and per role),
and `transport: auto` picks cuda_ipc on a GPU engine and ucx otherwise (README's claims)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray.serve  # noqa: F401 (a dependency the tests need: missing fails)
from pdray.deployments.app import build_app, parse_args  # noqa: E402
from pdray.deployments.engine_replica import resolve_transport  # noqa: E402


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"model": "dummy:tiny", "redis_ulr": "redis://x"}, "redis_ulr"),
        ({"model": "dummy:tiny", "prefill": {"replcas": 2}}, "prefill.replcas"),
        ({"model": "dummy:tiny", "decode": {"engine_arg": {}}}, "decode.engine_arg"),
        ({"model": "dummy:tiny", "transport": "tcp"}, "transport"),
        ({"model": "dummy:tiny", "router_replicas": 0}, "router_replicas"),
    ],
)
def test_invalid_keys_fail_naming_the_key(args, named):
    with pytest.raises(ValueError, match=f"invalid pdray app args: .*{named}"):
        parse_args(args)


def test_valid_args_parse():
    args = parse_args({"model": "dummy:tiny", "mixed": {"replicas": 1}, "transport": "auto"})
    assert args.mixed.replicas == 1 and args.transport == "auto"


@pytest.mark.parametrize(("device", "kind"), [("cpu", "ucx"), ("cuda", "cuda_ipc")])
def test_transport_auto_follows_the_engine_device(device, kind):
    engine = SimpleNamespace(runner=SimpleNamespace(device=SimpleNamespace(type=device)))
    assert resolve_transport("auto", engine) == kind
    assert resolve_transport("ucx", engine) == "ucx"  # an explicit choice is kept


def test_router_replicas_sets_the_ingress_deployment():
    app = build_app({"model": "dummy:tiny", "device": "cpu", "router_replicas": 3})
    router = app._bound_deployment  # the ingress: the deployment `serve run` exposes
    assert (router.name, router.num_replicas) == ("Router", 3)
    assert build_app({"model": "dummy:tiny", "device": "cpu"})._bound_deployment.num_replicas == 1
