"""The Ray Serve deployment of one engine instance (prefill, decode or mixed role).

Every method takes `replica_id` (used by ReplicaIdRouter to deliver the call here) and refuses
a call meant for another replica (one that is gone), so the router fails over at once. A
heartbeat thread publishes this instance's InstanceRecord to Redis every TTL/3 seconds and
updates its Ray metrics (deployments/metrics.py); if the engine thread dies the health check
fails and Ray Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

from pdray.deployments.args import AppArgs
from pdray.deployments.caller_deadlines import CallerDeadlines
from pdray.deployments.engine_replica import (
    make_engine_loop,
    params_from,
    submit,
)
from pdray.deployments.metrics import ReplicaMetrics
from pdray.deployments.output_channels import ChannelHub
from pdray.deployments.redis_host import resolve_redis_url
from ray import serve

from pdray.config import Role
from pdray.engine.loop import AsyncSink
from pdray.engine.role_worker import PrefillResult
from pdray.kv_transfer.base import Ticket
from pdray.router.heartbeat import run_heartbeat
from pdray.router.store import InstanceRecord, record_key

logger = logging.getLogger(__name__)


class ReplicaGoneError(RuntimeError):
    """A call reached a replica other than the one it named (that one died or was replaced)."""


class PDReplica:
    def __init__(self, args: dict, role: str):
        self.args = AppArgs(**args)
        self.role = Role(role)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.loop = make_engine_loop(self.role, self.args, self.replica_id)
        self.worker = self.loop.worker
        self.engine = self.worker.engine
        self._deadlines = CallerDeadlines(self.args.request_timeout_s, self._abort_late)
        self._channels = ChannelHub(ended=self._deadlines.end, abort=self._abort_late)
        self._key = record_key(self.args.app_name, self.replica_id)
        self._stop = threading.Event()
        kv = getattr(self.worker, "sender", None) or getattr(self.worker, "receiver", None)
        self._metrics = ReplicaMetrics(
            self.role.value, self.replica_id, getattr(kv, "metrics", None)
        )
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="pdray-heartbeat").start()
        threading.Thread(
            target=self._deadlines.run, args=(self._stop,), daemon=True, name="pdray-reaper"
        ).start()

    # -- calls from the router -------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt, params: dict, channel: str, replica_id: str | None = None
    ) -> None:
        """Mixed: start the request; its outputs go to the caller's `channel`."""
        self._check_target(replica_id)
        sink = self._channels.sink(channel, request_id)
        self._deadlines.start(request_id)  # until its final output (or the reaper aborts it)
        try:
            await submit(
                self.loop, request_id, sink,
                lambda: self.worker.add(request_id, prompt, params_from(params)),
            )  # fmt: skip
        except BaseException:
            self._channels.drop(channel, request_id)
            self._deadlines.end(request_id)
            raise

    async def reserve(
        self, request_id: str, prompt, params: dict, channel: str, replica_id: str | None = None
    ) -> dict | None:
        """Decode: a Ticket (as JSON) for the prompt's KV, or None (no room now: nothing
        follows). Once admitted, the request's outputs go to the caller's `channel`."""
        self._check_target(replica_id)
        sink = self._channels.sink(channel, request_id)
        self._deadlines.start(request_id)  # until its final output (or the reaper aborts it)
        ticket = None
        try:
            ticket = await submit(
                self.loop, request_id, sink,
                lambda: self.worker.reserve(request_id, prompt, params_from(params)),
            )  # fmt: skip
            if ticket is None:
                await asyncio.wrap_future(self.loop.abort(request_id))  # drops the sink
        finally:
            if ticket is None:
                self._channels.drop(channel, request_id)
                self._deadlines.end(request_id)
        return None if ticket is None else ticket.model_dump(mode="json")

    async def channel(self, channel_id: str, replica_id: str | None = None):
        """The outputs of every request a router sent here with `channel_id`: one batch of
        (request id, output) per engine step (deployments/output_channels.py)."""
        self._check_target(replica_id)
        async for batch in self._channels.stream(channel_id):
            yield batch

    async def prefill(
        self,
        request_id: str,
        prompt,
        params: dict,
        ticket: dict | None,
        replica_id: str | None = None,
        ticket_follows: bool = False,
    ):
        """Streams the first-token output as soon as it is sampled, then a PrefillResult once
        the KV and first token are handed off (its `error` says why not). With
        `ticket_follows`, the ticket comes through `attach` while the prompt computes."""
        self._check_target(replica_id)
        sink = AsyncSink()
        ticket = None if ticket is None else Ticket(**ticket)
        try:
            await submit(
                self.loop, request_id, sink,
                lambda: self.worker.submit(
                    request_id, prompt, params_from(params), ticket, ticket_follows=ticket_follows
                ),
            )  # fmt: skip
        except Exception as e:
            yield PrefillResult(request_id, None, f"{type(e).__name__}: {e}")
            return
        self._deadlines.start(request_id)
        try:
            async for item in self.loop.stream(request_id, sink):
                yield item
        finally:
            self._deadlines.end(request_id)

    async def attach(self, request_id: str, ticket: dict, replica_id: str | None = None) -> bool:
        """Prefill: the decode ticket of a request submitted with `ticket_follows`."""
        self._check_target(replica_id)
        ticket = Ticket(**ticket)
        return await asyncio.wrap_future(
            self.loop.call(lambda: self.worker.attach(request_id, ticket))
        )

    async def abort(self, request_id: str, replica_id: str | None = None) -> None:
        self._check_target(replica_id)
        self._deadlines.end(request_id)
        await asyncio.wrap_future(self.loop.abort(request_id))

    def _abort_late(self, request_id: str) -> None:
        """The reaper's abort (its thread): the request outlived its router's deadline."""
        self.loop.abort(request_id)

    async def stats(self, replica_id: str | None = None) -> dict:
        self._check_target(replica_id)
        return self._record().model_dump(mode="json")

    def _check_target(self, replica_id: str | None) -> None:
        if replica_id is not None and replica_id != self.replica_id:
            raise ReplicaGoneError(
                f"a call for replica {replica_id} reached {self.replica_id}: "
                f"{replica_id} is no longer serving"
            )

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: its engine thread stopped, or one of its
        tensor-parallel ranks (a worker actor) died."""
        if not self.loop.alive:
            raise RuntimeError("the engine loop has stopped")
        group = self.engine.runner.tp_group
        dead = group.dead() if group is not None else []
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited: this replica cannot run its model")

    def __del__(self) -> None:
        """Serve's graceful shutdown of this replica: stop the heartbeat and the engine, whose
        close stops its tensor-parallel ranks with a deadline (pdray/worker/tp_group.py)."""
        if hasattr(self, "_stop"):  # not when __init__ failed
            self._stop.set()
        if hasattr(self, "loop"):
            self.loop.close(timeout_s=10)

    # -- heartbeat -------------------------------------------------------------------------------

    def _record(self) -> InstanceRecord:
        scheduler = self.engine.scheduler
        waiting = list(scheduler.waiting)
        running = list(scheduler.running)
        # Prompt tokens not yet prefilled (queued sequences are never FINISHED).
        queued = sum(s.num_uncomputed_tokens for s in waiting + running if s.num_output_tokens == 0)
        descriptor = getattr(self.worker, "descriptor", None)
        return InstanceRecord(
            instance_id=self.replica_id,
            role=self.role,
            host=socket.gethostname(),
            address={"replica_id": self.replica_id},
            kv_transport={} if descriptor is None else descriptor.model_dump(mode="json"),
            queued_prefill_tokens=queued,
            running_requests=len(running),
            waiting_requests=len(waiting) + len(getattr(self.worker, "pending", {})),
            free_kv_blocks=self.engine.num_free_blocks,
            total_kv_blocks=self.engine.block_manager.num_blocks,
            block_size=self.engine.config.block_size,
            time_s=time.time(),
        )

    def _heartbeat_loop(self) -> None:
        """Until __del__ sets _stop or the engine dies; survives Redis being unreachable."""
        run_heartbeat(
            key=self._key,
            ttl_s=self.args.scheduler_ttl_s,
            make_record=self._record,
            redis_url=lambda: resolve_redis_url(self.args.redis_url),
            stop=self._stop,
            alive=lambda: self.loop.alive,
            on_record=self._metrics.update,
        )
