"""The ingress: OpenAI HTTP API over a PD backend that picks instances from Redis records.

Per request: pick a decode instance (load, free blocks) and a prefill instance (queued prompt
tokens) from the snapshot -> decode.reserve -> prefill.prefill(ticket) in the background ->
stream decode's outputs. A failure before the first token marks the instance down and tries
another pair (up to max_attempts); after it, the error reaches the client. With no PD pair
available, mixed instances serve. A client that leaves aborts the request on both instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.args import AppArgs
from deployments.redis_host import DEPLOYMENT_NAME as REDIS_HOST
from pdray.config import Role
from pdray.entrypoints.openai.api import build_openai_app
from pdray.entrypoints.openai.protocol import NoCapacityError
from pdray.models.loader import load_model_config
from pdray.outputs import RequestOutput
from pdray.router.policy import InstancePicker, PolicyConfig, RouterSnapshot
from pdray.router.store import InstanceStore
from pdray.sampling_params import SamplingParams
from pdray.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEPLOYMENT_NAMES = {Role.PREFILL: "Prefill", Role.DECODE: "Decode", Role.MIXED: "Mixed"}
_RESERVE_TIMEOUT_S = 30.0


class PDBackend:
    def __init__(self, args: AppArgs):
        self.args = args
        _, arch, _ = load_model_config(args.model)
        self.vocab_size = arch.vocab_size
        engine_max = args.decode.engine_args.get("max_model_len") or arch.max_position_embeddings
        self.max_model_len = engine_max
        self._tokenizer = load_tokenizer(args.model, None, arch.vocab_size)
        self.snapshot: RouterSnapshot | None = None
        self._started: asyncio.Task | None = None
        self._handles: dict[Role, Any] = {}
        self._placed: dict[str, list[tuple[Role, str]]] = {}

    def tokenizer(self) -> Any:
        return self._tokenizer

    def _handle(self, role: Role):
        if role not in self._handles:
            app_name = serve.get_replica_context().app_name
            self._handles[role] = serve.get_deployment_handle(DEPLOYMENT_NAMES[role], app_name)
        return self._handles[role]

    async def _ensure_snapshot(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._start_snapshot())
        await asyncio.shield(self._started)

    async def _start_snapshot(self) -> None:
        url = self.args.redis_url
        if url is None:
            app_name = serve.get_replica_context().app_name
            url = await serve.get_deployment_handle(REDIS_HOST, app_name).url.remote()
        store = InstanceStore(url, self.args.app_name, self.args.scheduler_ttl_s)
        picker = InstancePicker(PolicyConfig(window_fraction=min(self.args.random_window, 1.0)))
        self.snapshot = RouterSnapshot(store, picker=picker)
        await self.snapshot.start()

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        await self._ensure_snapshot()
        num_tokens = len(prompt) if isinstance(prompt, list) else 0
        exclude: set[str] = set()
        last_error = "no instance available"
        for _ in range(self.args.max_attempts):
            streamed = False
            try:
                async for output in self._one_attempt(
                    request_id, prompt, params, num_tokens, exclude
                ):
                    streamed = True
                    yield output
                return
            except NoCapacityError as e:
                last_error = str(e)
                break
            except _InstanceFailed as e:
                if streamed:
                    raise RuntimeError(f"request {request_id} failed mid-stream: {e}") from None
                last_error = str(e)
                exclude.add(e.instance_id)
                await self.snapshot.mark_down(e.instance_id)
            finally:
                await self._cleanup(request_id)
        raise NoCapacityError(f"no instance could take the request: {last_error}")

    async def _one_attempt(self, request_id, prompt, params, num_tokens, exclude):
        snapshot = self.snapshot
        if not snapshot.records():
            await snapshot.refresh()  # e.g. the first request right after start-up
        pd = snapshot.records(Role.PREFILL) and snapshot.records(Role.DECODE)
        if not pd:
            mixed = snapshot.pick_decode(num_tokens=num_tokens, role=Role.MIXED, exclude=exclude)
            self._placed[request_id] = [(Role.MIXED, mixed.instance_id)]
            handle = self._handle(Role.MIXED).options(stream=True)
            gen = handle.generate.remote(
                request_id, prompt, params.to_dict(), replica_id=mixed.instance_id
            )
            async for output in _guard(gen, mixed.instance_id):
                yield output
            return
        decode = snapshot.pick_decode(num_tokens=num_tokens, exclude=exclude)
        prefill = snapshot.pick_prefill(exclude=exclude)
        self._placed[request_id] = [
            (Role.DECODE, decode.instance_id),
            (Role.PREFILL, prefill.instance_id),
        ]
        ticket = await _call(
            self._handle(Role.DECODE).reserve.remote(
                request_id, prompt, params.to_dict(), replica_id=decode.instance_id
            ),
            decode.instance_id,
        )
        if ticket is None:
            raise _InstanceFailed(decode.instance_id, "decode instance has no free KV blocks")
        prefill_call = self._handle(Role.PREFILL).prefill.remote(
            request_id, prompt, params.to_dict(), ticket, replica_id=prefill.instance_id
        )
        watcher = asyncio.ensure_future(_watch_prefill(prefill_call, request_id))
        try:
            gen = (
                self._handle(Role.DECODE)
                .options(stream=True)
                .stream.remote(request_id, replica_id=decode.instance_id)
            )
            async for output in _guard(gen, decode.instance_id):
                yield output
        finally:
            watcher.cancel()

    async def _cleanup(self, request_id: str) -> None:
        for role, instance_id in self._placed.pop(request_id, []):
            with contextlib.suppress(Exception):
                await self._handle(role).abort.remote(request_id, replica_id=instance_id)

    async def abort(self, request_id: str) -> None:
        await self._cleanup(request_id)


class _InstanceFailed(RuntimeError):
    def __init__(self, instance_id: str, message: str):
        super().__init__(message)
        self.instance_id = instance_id


async def _call(response, instance_id: str):
    try:
        return await asyncio.wait_for(response, _RESERVE_TIMEOUT_S)
    except Exception as e:  # timeout, replica death, or an error it raised
        raise _InstanceFailed(instance_id, f"{type(e).__name__}: {e}") from None


async def _guard(gen, instance_id: str):
    """Re-raise a replica's death as _InstanceFailed; ValueErrors (bad input) pass through."""
    try:
        async for output in gen:
            yield output
    except ValueError:
        raise
    except Exception as e:
        if _is_user_error(e):
            raise ValueError(str(e)) from None
        raise _InstanceFailed(instance_id, f"{type(e).__name__}: {e}") from None


def _is_user_error(e: Exception) -> bool:
    cause = getattr(e, "cause", None) or e.__cause__
    return isinstance(cause, ValueError)


async def _watch_prefill(response, request_id: str) -> None:
    """The decode side recovers from prefill failures (lease, policy); log them here."""
    try:
        error = await response
        if error:
            logger.warning(
                "prefill of %s: %s (decode applies its failure policy)", request_id, error
            )
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.warning(
            "prefill of %s failed: %s (decode applies its failure policy)", request_id, e
        )


def build_router_app(args: dict):
    """ASGI app builder, evaluated inside each router replica."""
    app_args = AppArgs(**args)
    return build_openai_app(
        PDBackend(app_args), model_name=app_args.model_name, api_key=app_args.api_key
    )


class Router:
    """Ray Serve ingress; the routes come from build_router_app. The engine deployments are
    bound as arguments so that they are part of the application."""

    def __init__(self, **engine_deployments):
        self.engine_deployments = engine_deployments
