"""Builds one replica's engine loop (pdray/engine/loop.py) and streams a request's items from it.

Request paths (deployments/replica.py):
  mixed   generate(prompt)                      -> outputs until the finished one
  decode  reserve(prompt) -> ticket; stream(id)  -> outputs once the KV arrived (or recomputed)
  prefill prefill(prompt, ticket)               -> the first-token output, then PrefillResult
  any     abort(id): frees the request's blocks; a stream whose consumer left aborts itself.
"""

from __future__ import annotations

import asyncio

from pdray.config import EngineConfig, Role
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.loop import AsyncSink, EngineLoop, Inbox
from pdray.engine.role_worker import MixedWorker, RoleWorker
from pdray.sampling_params import SamplingParams


def make_engine_loop(role: Role, args, replica_id: str) -> EngineLoop:
    """The engine (and PD worker) of one replica, running on its own loop thread."""
    role_args = getattr(args, role.value)
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        role=role,
        **role_args.engine_kwargs(),
    )
    engine = LLMEngine(config)
    inbox = Inbox()
    try:
        worker = _make_worker(role, args, replica_id, engine, inbox)
    except BaseException:
        engine.close()
        raise
    return EngineLoop(worker, inbox)


def _make_worker(role: Role, args, replica_id: str, engine: LLMEngine, inbox: Inbox) -> RoleWorker:
    if role is Role.MIXED:
        return MixedWorker(engine)
    from pdray.disagg.decode import DecodeWorker
    from pdray.disagg.prefill import PrefillWorker
    from pdray.kv_transfer import make_transport

    kind = resolve_transport(args.transport, engine)
    options = (
        {"net_devices": args.ucx_net_devices} if kind == "ucx" and args.ucx_net_devices else {}
    )
    transport = make_transport(kind, **options)
    if role is Role.PREFILL:
        return PrefillWorker(engine, transport, wake=inbox.wake)
    return DecodeWorker(
        engine,
        transport,
        engine_id=replica_id,
        lease_s=args.lease_s,
        policy=args.failure_policy,
        wake=inbox.wake,
    )


def resolve_transport(transport: str, engine: LLMEngine) -> str:
    if transport != "auto":
        return transport
    return "cuda_ipc" if engine.runner.device.type == "cuda" else "ucx"


async def submit(loop: EngineLoop, request_id: str, sink: AsyncSink, command) -> object:
    return await asyncio.wrap_future(loop.submit(request_id, sink, command))


def params_from(params: dict | SamplingParams) -> SamplingParams:
    return params if isinstance(params, SamplingParams) else SamplingParams(**params)
