"""The ingress: OpenAI HTTP API over a PD backend that picks instances from Redis records.

Per request: pick a decode instance (load, free blocks) and a prefill instance (queued prompt
tokens) from the snapshot -> decode.reserve (the ticket) -> prefill.prefill(ticket) -> the
first token from prefill, the rest from decode through this router's output channel from that
decode replica (deployments/output_channels.py: one stream carries all of its requests). With
`overlap_prefill`, prefill.prefill(ticket_follows) goes first and the ticket follows (`attach`).
With no PD pair available, mixed instances serve. A client that leaves aborts the request on
both instances.

Failures: a call that fails before the request's first token (the instance died, was replaced,
or refused) marks that instance down (its record is deleted; it is not picked again until it
heartbeats after a TTL), aborts the attempt on the others, and tries another pair, up to
max_attempts. Once tokens have been streamed, a failure ends the request with an error naming
the instance (nothing is streamed twice). An instance that ends a stream with finish reason
"abort" the router did not send (the engine dropped the request) is not a finished request: decode
or mixed doing so fails the attempt (retried like a failure, the instance not marked down);
prefill doing so leaves the request to decode. Only a client that left ends quietly on an abort.
A prefill call that raises (its replica died) leaves the request to decode's lease and policy and
marks that prefill instance down.

A full decode instance (no free KV blocks for the prompt, by its record or by its answer to
`reserve`) is healthy: the request tries another one. While nothing can take the request (every
live decode instance full, or no live instance of a role in the snapshot: not registered yet,
being replaced, or a record the snapshot saw late) it waits (pauses from `_WAIT_S` doubling to
`_WAIT_MAX_S`, the snapshot refreshed after each) for up to `queue_timeout_s`, then gets a 503. Metrics (deployments/metrics.py): one RequestTrace
per request, recorded when it ends, and one counter increment per routing decision.

Every request has an end-to-end deadline, `request_timeout_s` from its arrival (queueing,
attempts, streaming): past it the request is aborted on the instances of its current attempt
(earlier attempts were aborted when they failed) and ends with `RequestTimeoutError` (HTTP 504).

Redis unreachable (restarting, down): requests are routed from the last snapshot (its records
age out after the TTL) or wait as above and get a 503 that says Redis is unreachable; the
snapshot and the replicas' heartbeats pick Redis up again when it answers (pdray/router/).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

from pdray.deployments.args import AppArgs
from pdray.deployments.metrics import (
    RequestStatus,
    RequestTrace,
    RoutingOutcome,
    Span,
    record_routing,
)
from pdray.deployments.output_channels import ChannelClient
from pdray.deployments.redis_host import DEPLOYMENT_NAME as REDIS_HOST
from ray import serve

from pdray.config import Role
from pdray.disagg.client_stream import AttemptAborted, SentTokens, ended_by_abort, pd_outputs
from pdray.engine.role_worker import FailureKind, HandoffFailed, PrefillResult
from pdray.entrypoints.openai.api import build_openai_app
from pdray.entrypoints.openai.protocol import NoCapacityError
from pdray.models.loader import load_model_config
from pdray.outputs import RequestOutput
from pdray.router.deadline import RequestTimeoutError, until_deadline
from pdray.router.policy import InstancePicker, PolicyConfig, RouterSnapshot
from pdray.router.store import InstanceRecord, InstanceStore
from pdray.sampling_params import SamplingParams
from pdray.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEPLOYMENT_NAMES = {Role.PREFILL: "Prefill", Role.DECODE: "Decode", Role.MIXED: "Mixed"}
_RESERVE_TIMEOUT_S = 30.0
_ABORT_TIMEOUT_S = 10.0
_WAIT_S, _WAIT_MAX_S = 0.05, 0.5  # waiting for an instance that can take a request: pauses


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
        # request id -> (id of its current attempt on the instances, [(role, instance id)])
        self._placed: dict[str, tuple[str, list[tuple[Role, str]]]] = {}
        self._background: set[asyncio.Task] = set()
        self._leaving: set[str] = set()  # requests whose client left (`abort`): ends are quiet
        self._channels: dict[str, ChannelClient] = {}  # decode/mixed instance id -> its channel

    def tokenizer(self) -> Any:
        return self._tokenizer

    def _handle(self, role: Role):
        if role not in self._handles:
            app_name = serve.get_replica_context().app_name
            self._handles[role] = serve.get_deployment_handle(DEPLOYMENT_NAMES[role], app_name)
        return self._handles[role]

    async def _ensure_snapshot(self) -> None:
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception())):
            self._started = asyncio.ensure_future(self._start_snapshot())  # (again if it failed)
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
        """The request's outputs; past `request_timeout_s` it is aborted on its instances (the
        attempts' cleanup) and ends with RequestTimeoutError."""
        trace = RequestTrace()
        status = RequestStatus.ABORTED  # unless it finishes or fails: the consumer left
        timeout_s = self.args.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        message = (
            f"request {request_id} did not finish within request_timeout_s={timeout_s:g} s; "
            "it was aborted"
        )
        try:
            attempts = self._attempts(request_id, prompt, params, trace)
            async with contextlib.aclosing(until_deadline(attempts, deadline, message)) as outputs:
                async for output in outputs:  # closed on every path, the attempts' with it
                    trace.on_output(output)
                    if output.finished:
                        status = _finish_status(output)
                    yield output
        except NoCapacityError:
            status = RequestStatus.NO_CAPACITY
            raise
        except RequestTimeoutError:
            status = RequestStatus.TIMEOUT
            raise
        except ValueError:
            status = RequestStatus.INVALID
            raise
        except Exception:
            status = RequestStatus.ERROR
            raise
        finally:
            self._leaving.discard(request_id)
            trace.record(status)

    async def _attempts(self, request_id, prompt, params, trace: RequestTrace):
        """Pairs tried in turn until one streams. A failure after decode streamed tokens ends the
        request; one after only the first token (from prefill) retries, and the new attempt's
        outputs pass only if they agree with what was sent (`SentTokens`)."""
        await self._ensure_snapshot()
        sent = SentTokens()
        num_tokens = len(prompt) if isinstance(prompt, list) else 0
        exclude: set[str] = set()  # failed instances
        full: set[str] = set()  # decode instances without room for this request just now
        wait_deadline = time.monotonic() + self.args.queue_timeout_s
        failures, wait_s = 0, _WAIT_S
        last_error = "no instance available"
        for attempt in itertools.count():
            attempt_id = request_id if attempt == 0 else f"{request_id}.{attempt}"
            try:
                async for output in self._one_attempt(
                    request_id, attempt_id, prompt, params, num_tokens, exclude, full, sent, trace
                ):
                    yield output
                return
            except _ClientLeft:
                return
            except _FailedAttempt as e:
                failures += 1
                record_routing(e.role.value, e.instance_id, RoutingOutcome.FAILED)
                last_error = str(e)
                if e.instance_lives:  # prefer another instance for the retry, if there is one
                    others = exclude | {e.instance_id}
                    if any(r.instance_id not in others for r in self.snapshot.records(e.role)):
                        full.add(e.instance_id)
                else:
                    exclude.add(e.instance_id)
                    await self.snapshot.mark_down(e.instance_id)
                    # The other instance of the attempt can be slow to answer (a prefill replica
                    # may be busy failing to reach a dead decode one): abort there in the
                    # background. The next attempt has its own id, so the abort cannot hit it.
                    placed = self._placed.pop(request_id, (attempt_id, []))
                    self._spawn(self._abort(*placed, skip=set(exclude)))
                if e.final:
                    raise RuntimeError(f"request {request_id}: {e}") from None
                if sent.most > 1:
                    raise RuntimeError(
                        f"request {request_id}: {e}, after streaming {sent.most} token(s), "
                        "which cannot be resumed"
                    ) from None
                if failures >= self.args.max_attempts:
                    break
                logger.warning("request %s: %s; trying another pair", request_id, e)
            except _InstanceFull as e:
                record_routing(Role.DECODE.value, e.instance_id, RoutingOutcome.FULL)
                full.add(e.instance_id)
            except _Unavailable as e:  # nothing can take it right now: wait
                if time.monotonic() > wait_deadline:
                    record_routing(e.role.value, "", RoutingOutcome.NO_INSTANCE)
                    why = (
                        f"every live {e.role.value} instance stayed full (no free KV blocks "
                        "for the prompt)" if e.full else str(e)
                    )  # fmt: skip
                    last_error = f"{why} for queue_timeout_s={self.args.queue_timeout_s:g} s"
                    if self.snapshot.outage.error:  # served from the last snapshot meanwhile
                        last_error += f"; {self.snapshot.outage.describe()}"
                    break
                full.clear()
                await asyncio.sleep(wait_s)
                wait_s = min(2 * wait_s, _WAIT_MAX_S)
                await self.snapshot.refresh()
            finally:
                self._cleanup(request_id)
        raise NoCapacityError(f"no instance could take the request: {last_error}")

    def _pick_decode(self, role: Role, num_tokens: int, exclude: set[str], full: set[str]):
        """A decode (or mixed) instance with room, else _Unavailable (full: the ones that have not
        failed are all full)."""
        try:
            record = self.snapshot.pick_decode(
                num_tokens=num_tokens, role=role, exclude=exclude | full
            )
        except NoCapacityError as e:
            full = any(r.instance_id not in exclude for r in self.snapshot.records(role))
            raise _Unavailable(role, str(e), full) from None
        record_routing(role.value, record.instance_id, RoutingOutcome.PICKED)
        return record

    def _pick_prefill(self, exclude: set[str]) -> InstanceRecord:
        """The prefill instance with the fewest queued prompt tokens, else _Unavailable."""
        try:
            record = self.snapshot.pick_prefill(exclude=exclude)
        except NoCapacityError as e:
            raise _Unavailable(Role.PREFILL, str(e)) from None
        record_routing(Role.PREFILL.value, record.instance_id, RoutingOutcome.PICKED)
        return record

    async def check_health(self) -> None:
        """/health: ready once a prefill/decode pair or a mixed replica is registered in Redis
        (the app answers HTTP before its engines have loaded and sent their first heartbeat)."""
        await self._ensure_snapshot()
        snapshot = self.snapshot
        await snapshot.refresh()
        pd = snapshot.records(Role.PREFILL) and snapshot.records(Role.DECODE)
        if not pd and not snapshot.records(Role.MIXED):
            outage = snapshot.outage.describe()
            raise RuntimeError(
                "no prefill/decode pair or mixed replica is registered yet"
                + (f" ({outage})" if outage else "")
            )

    async def _one_attempt(
        self, request_id, attempt_id, prompt, params, num_tokens, exclude, full, sent, trace
    ):
        snapshot = self.snapshot
        if not snapshot.records():
            await snapshot.refresh()  # e.g. the first request right after start-up
        pd = snapshot.records(Role.PREFILL) and snapshot.records(Role.DECODE)
        if not pd:
            mixed = self._pick_decode(Role.MIXED, num_tokens, exclude, full)
            self._placed[request_id] = (attempt_id, [(Role.MIXED, mixed.instance_id)])
            trace.role, trace.replica = Role.MIXED.value, mixed.instance_id
            handle = self._handle(Role.MIXED)
            outputs = self._channel(Role.MIXED, mixed.instance_id).request(
                attempt_id,
                lambda channel: handle.generate.remote(
                    attempt_id, prompt, params.to_dict(), channel, replica_id=mixed.instance_id
                ),
            )
            async for output in _guard(outputs, mixed):
                if ended_by_abort(output):
                    self._aborted_by(mixed, request_id)
                self._forget_if_finished(request_id, output)
                if sent.admit(output):
                    yield output
            return
        decode = self._pick_decode(Role.DECODE, num_tokens, exclude, full)
        prefill = self._pick_prefill(exclude)
        placed = [(Role.DECODE, decode.instance_id), (Role.PREFILL, prefill.instance_id)]
        self._placed[request_id] = (attempt_id, placed)
        trace.role, trace.replica = Role.DECODE.value, decode.instance_id
        # With overlap_prefill (and no tensor-parallel prefill), prefill starts computing while
        # decode reserves; the ticket follows (`attach`), and the first token waits for it.
        # Decode answers `reserve` with the ticket; its outputs come through its channel.
        follows = self.args.overlap_prefill and self.args.prefill.tensor_parallel_size == 1
        prefill_call = self._handle(Role.PREFILL).options(stream=True).prefill
        if follows:  # sent first: the prompt's compute is the longest part of the first token
            prefill_items = prefill_call.remote(
                attempt_id, prompt, params.to_dict(), None, replica_id=prefill.instance_id,
                ticket_follows=True,
            )  # fmt: skip
        decode_handle = self._handle(Role.DECODE)
        decode_items = self._channel(Role.DECODE, decode.instance_id).request(
            attempt_id,
            lambda channel: decode_handle.reserve.remote(
                attempt_id, prompt, params.to_dict(), channel, replica_id=decode.instance_id
            ),
            reply=True,
        )
        decode_outputs = _guard(decode_items, decode)
        try:
            ticket = await _reserved(decode_outputs, decode)
            if ticket is None:
                raise _InstanceFull(decode)  # the cleanup aborts the prefill request too
        except BaseException:
            if follows:
                prefill_items.cancel()  # never read: cancel it rather than leave it to GC
            with contextlib.suppress(BaseException):
                await decode_outputs.aclose()  # the cleanup aborts the request on decode
            raise
        trace.mark(Span.RESERVED)
        if follows:
            self._spawn(self._attach(prefill, attempt_id, ticket))
        else:
            prefill_items = prefill_call.remote(
                attempt_id, prompt, params.to_dict(), ticket, replica_id=prefill.instance_id
            )

        async def decode_stream():
            async with contextlib.aclosing(decode_outputs):
                async for output in decode_outputs:
                    self._forget_if_finished(request_id, output)
                    yield output

        outputs = pd_outputs(
            _cancelling(prefill_items), decode_stream(), params, sent,
            functools.partial(self._prefill_ended, prefill, attempt_id), trace.observe,
        )  # fmt: skip
        try:
            async for output in outputs:
                yield output
        except AttemptAborted:
            self._aborted_by(decode, request_id)
            raise

    def _prefill_ended(
        self, prefill: InstanceRecord, attempt_id: str, end: PrefillResult | Exception
    ) -> None:
        """Decode recovers the request (lease, policy); a prefill call that raised (the replica
        died, or the call reached another one) also marks that instance down, so requests
        arriving before its record expires do not pick it."""
        _log_prefill_end(attempt_id, end)
        if isinstance(end, Exception) and not _is_user_error(end):
            record_routing(Role.PREFILL.value, prefill.instance_id, RoutingOutcome.FAILED)
            self._spawn(self.snapshot.mark_down(prefill.instance_id))

    def _channel(self, role: Role, instance_id: str) -> ChannelClient:
        """This router's output channel from a decode or mixed instance (opened on first use)."""
        client = self._channels.get(instance_id)
        if client is None:
            handle = self._handle(role).options(stream=True)

            def closed(client: ChannelClient) -> None:
                if self._channels.get(instance_id) is client:
                    del self._channels[instance_id]

            client = self._channels[instance_id] = ChannelClient(
                lambda channel_id: _cancelling(
                    handle.channel.remote(channel_id, replica_id=instance_id)
                ),
                closed,
            )
        return client

    def _forget_if_finished(self, request_id: str, output: RequestOutput) -> None:
        """A decode or mixed engine's final output ends the request in every engine it reached
        (prefill handed it off before decode admitted it): the cleanup has nothing to abort."""
        if output.finished and not ended_by_abort(output):
            self._placed.pop(request_id, None)

    def _aborted_by(self, instance: InstanceRecord, request_id: str) -> None:
        """An instance ended the attempt with an abort: quietly if the client left (the router's
        own `abort`), else the attempt failed (an engine's abort is never a finished request)."""
        if request_id in self._leaving:
            raise _ClientLeft()
        raise _AttemptAborted(instance)

    async def _attach(self, prefill: InstanceRecord, attempt_id: str, ticket: dict) -> None:
        """Hand decode's ticket to the prefill instance already computing the prompt; if that
        fails, decode's lease and failure policy take over."""
        call = self._handle(Role.PREFILL).attach.remote(
            attempt_id, ticket, replica_id=prefill.instance_id
        )
        try:
            if not await asyncio.wait_for(call, _RESERVE_TIMEOUT_S):
                logger.warning("prefill of %s ended before its ticket came", attempt_id)
        except Exception as e:
            logger.warning("ticket of %s not attached on %s: %s", attempt_id,
                           prefill.instance_id, _brief(e))  # fmt: skip

    def _cleanup(self, request_id: str) -> asyncio.Task | None:
        """Abort the request's current attempt on its instances (idempotent), in a task of its
        own: this runs while the request's task is being cancelled (a client that left, whose
        stream anyio cancels again at every await), and an abort awaited there would be
        cancelled before it was sent, leaving the request running on decode."""
        placed = self._placed.pop(request_id, None)
        return None if placed is None else self._spawn(self._abort(*placed))

    async def _abort(
        self, attempt_id: str, placed: list[tuple[Role, str]], skip: Collection[str] = ()
    ) -> None:
        for role, instance_id in placed:
            if instance_id in skip:
                continue
            call = self._handle(role).abort.remote(attempt_id, replica_id=instance_id)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call, _ABORT_TIMEOUT_S)

    def _spawn(self, coro) -> asyncio.Task:
        """Run coro in the background, outside the request's context: Serve's handle router spins
        on two pending calls to one deployment with the same (inherited) internal request id,
        e.g. `attach` beside the request's `prefill` call, or an old attempt's abort beside the
        next attempt's calls."""
        task = contextvars.Context().run(asyncio.ensure_future, coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def abort(self, request_id: str) -> None:
        if request_id in self._placed:  # in flight (generate's end forgets it again)
            self._leaving.add(request_id)
        aborting = self._cleanup(request_id)
        if aborting is not None:  # shielded: the abort goes on if this call is cancelled
            await asyncio.shield(aborting)


def _finish_status(output: RequestOutput) -> RequestStatus:
    try:
        return RequestStatus(output.outputs[0].finish_reason)
    except ValueError:
        return RequestStatus.STOP


class _Unavailable(NoCapacityError):
    """No instance of `role` can take the request right now; `full`: live ones exist, all full."""

    def __init__(self, role: Role, message: str, full: bool = False):
        super().__init__(message)
        self.role, self.full = role, full


class _InstanceFull(Exception):
    """A decode instance answered `reserve` with no room for the prompt's KV."""

    def __init__(self, instance: InstanceRecord):
        super().__init__(f"decode instance {instance.instance_id} has no free KV blocks")
        self.instance_id = instance.instance_id


class _FailedAttempt(Exception):
    """An attempt that failed at one instance. `instance_lives`: the instance answered (prefer
    another for the retry, no mark-down); else it is marked down. `final`: no retry whatever
    was streamed (the instance's failure policy says fail)."""

    instance_lives = True
    final = False

    def __init__(self, instance: InstanceRecord, message: str):
        super().__init__(message)
        self.instance_id, self.role = instance.instance_id, instance.role


class _HandoffFailed(_FailedAttempt):
    """A decode instance did not get the prompt's KV; its failure policy is retry or fail."""

    def __init__(self, instance: InstanceRecord, failure: HandoffFailed):
        super().__init__(instance, f"the prompt's KV did not reach decode: {failure.reason}")
        self.final = failure.kind is FailureKind.FAILED


class _AttemptAborted(_FailedAttempt):
    """An instance ended an attempt with finish reason "abort" that the router did not ask for."""

    def __init__(self, instance: InstanceRecord):
        super().__init__(
            instance, f"{instance.role.value} instance {instance.instance_id} aborted the request"
        )


class _ClientLeft(Exception):
    """The attempt ended with the abort the router sent for a client that left."""


class _InstanceFailed(_FailedAttempt):
    """A call to an instance raised (its replica died, timed out, ...): marked down."""

    instance_lives = False

    def __init__(self, instance: InstanceRecord, message: str):
        super().__init__(
            instance, f"{instance.role.value} instance {instance.instance_id} failed: {message}"
        )


async def _reserved(decode_outputs, instance: InstanceRecord) -> dict | None:
    """The first item of decode's outputs (`_guard`ed): its ticket, or None (no room)."""
    try:
        return await asyncio.wait_for(anext(decode_outputs), _RESERVE_TIMEOUT_S)
    except StopAsyncIteration:
        raise _InstanceFailed(instance, "its stream ended before it answered reserve") from None
    except asyncio.TimeoutError:
        raise _InstanceFailed(
            instance, f"TimeoutError: no answer to reserve within {_RESERVE_TIMEOUT_S:g} s"
        ) from None


async def _cancelling(gen):
    """A Serve streaming response; left early, it is cancelled on the replica (which aborts
    the request there) instead of waiting for garbage collection."""
    done = False
    try:
        async for item in gen:
            yield item
        done = True
    finally:
        if not done:
            gen.cancel()


async def _guard(outputs, instance: InstanceRecord):
    """Re-raise a replica's death as _InstanceFailed; ValueErrors (bad input) pass through."""
    try:
        async for output in outputs:
            yield output
    except ValueError:
        raise
    except Exception as e:
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, HandoffFailed):
            raise _HandoffFailed(instance, cause) from None
        if _is_user_error(e):
            raise ValueError(str(_user_error(e))) from None
        raise _InstanceFailed(instance, _brief(e)) from None


def _brief(e: Exception) -> str:
    """`Type: first line` of the error a replica raised (Ray's go on for lines)."""
    cause = getattr(e, "cause", None)  # a RayTaskError wraps what the replica raised
    e = cause if isinstance(cause, Exception) else e
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _is_user_error(e: Exception) -> bool:
    return isinstance(_user_error(e), ValueError)


def _user_error(e: Exception) -> BaseException | None:
    """What a replica raised (a RayTaskError's `cause`), or the chained cause."""
    return getattr(e, "cause", None) or e.__cause__


def _log_prefill_end(request_id: str, end: PrefillResult | Exception) -> None:
    """The decode side recovers from prefill failures (lease, policy); log them here."""
    error = _brief(end) if isinstance(end, Exception) else end.error
    if error:
        logger.warning("prefill of %s: %s (decode applies its failure policy)", request_id, error)


def build_router_app(args: dict):
    """ASGI app builder, evaluated inside each router replica."""
    app_args = AppArgs(**args)
    return build_openai_app(
        PDBackend(app_args), model_name=app_args.model_name, api_key=app_args.api_key,
        max_n=app_args.max_n, max_request_body_bytes=app_args.max_request_body_bytes,
    )  # fmt: skip


class Router:
    """Ray Serve ingress; the routes come from build_router_app. The engine deployments are
    bound as arguments so that they are part of the application."""

    def __init__(self, **engine_deployments):
        self.engine_deployments = engine_deployments
