"""`build_app(args)`: the application serve_config.yaml imports.

    applications:
      - name: pdray
        import_path: pdray.deployments.app:build_app
        args: {model: dummy:tiny, prefill: {replicas: 1}, decode: {replicas: 1}}

Validates args (a bad key fails at start, naming it) and binds Router, Prefill, Decode, Mixed,
and RedisHost (a private redis-server) when no redis_url is given.
"""

from __future__ import annotations

import logging

from pdray.deployments.args import AppArgs
from pdray.deployments.redis_host import DEPLOYMENT_NAME as REDIS_HOST
from pdray.deployments.redis_host import RedisHost
from pdray.deployments.replica import PDReplica
from pdray.deployments.router import DEPLOYMENT_NAMES, Router, build_router_app
from pdray.deployments.routing import ReplicaIdRouter
from pydantic import ValidationError
from ray import serve
from ray.serve.config import RequestRouterConfig

from pdray.config import Role
from pdray.router.redis_server import free_port

logger = logging.getLogger(__name__)

# Every pdray replica runs its Serve-facing code on the replica's main event loop, not on a second
# loop in a thread of its own (Serve's default): each call and each streamed item then skips two
# thread hops. Our replica methods never block (engines run on their own threads). Measured in
# docs/performance.md ("Serve's user-code thread"): lower TTFT and ITL, for 1P1D most.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def parse_args(args: dict) -> AppArgs:
    try:
        return AppArgs(**(args or {}))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"invalid pdray app args: {problems}") from None


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def replica_resources(role_args, on_gpu: bool) -> tuple[dict, list[dict]]:
    """Ray resources of one replica: its actor options and its placement group, one bundle per
    tensor-parallel rank. Bundle 0 holds the replica itself, which runs rank 0 (the engine and
    its model shard); the other ranks' worker actors take one GPU each, or a sliver of CPU."""
    tp = role_args.tensor_parallel_size
    default_gpus = (1 if tp > 1 else 0.5) if on_gpu else 0
    num_gpus = role_args.num_gpus if role_args.num_gpus is not None else default_gpus
    options = {
        "num_cpus": role_args.num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": REPLICA_ENV},
    }
    first = {k: v for k, v in (("CPU", role_args.num_cpus), ("GPU", num_gpus)) if v}
    rank = {"GPU": 1} if on_gpu else {"CPU": 0.01}
    return options, [first or {"CPU": 0.01}] + [rank] * (tp - 1)


def build_app(args: dict) -> serve.Application:
    app_args = parse_args(args)
    plain = app_args.model_dump(mode="json")
    on_gpu = app_args.device != "cpu" and _gpu_available()
    engines = {}
    for role in (Role.PREFILL, Role.DECODE, Role.MIXED):
        role_args = getattr(app_args, role.value)
        if role_args.replicas == 0:
            continue
        actor_options, bundles = replica_resources(role_args, on_gpu)
        deployment = serve.deployment(PDReplica).options(
            name=DEPLOYMENT_NAMES[role],
            num_replicas=role_args.replicas,
            ray_actor_options=actor_options,
            placement_group_bundles=bundles,
            placement_group_strategy="STRICT_PACK",  # a replica's ranks share a node (NCCL, IPC)
            max_ongoing_requests=1024,
            request_router_config=RequestRouterConfig(request_router_class=ReplicaIdRouter),
            health_check_period_s=5,
        )
        engines[role.value] = deployment.bind(plain, role.value)
    if app_args.redis_url is None:
        host = serve.deployment(RedisHost).options(
            name=REDIS_HOST, num_replicas=1, ray_actor_options={"num_cpus": 0}
        )
        engines["redis"] = host.bind(port=free_port())  # kept if the replica is replaced

    def router_app():  # a plain function: Ray Serve calls it in each router replica
        return build_router_app(plain)

    ingress = serve.ingress(router_app)(Router)
    router = serve.deployment(ingress).options(
        name="Router",
        num_replicas=app_args.router_replicas,
        ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": REPLICA_ENV}},
        max_ongoing_requests=4096,
    )
    return router.bind(**engines)
