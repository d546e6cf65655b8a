"""A decode engine plus a KV receiver: reserves blocks under leases and continues requests.

Request lifecycle here:
  reserve -> AWAITING_KV (lease) -> KV + Handoff applied -> admitted -> decoding -> finished
                                 -> lease expired / transfer failed -> receiver revoked, blocks
                                    freed -> policy: recompute here | hand back for retry | fail
  abort at any point: receiver revoked first (no copy can still land), then blocks freed.

Driven by an EngineLoop (pdray/engine/loop.py): every KV message calls `wake`, so the loop steps
this worker as soon as a ticket may have completed; while only waiting for KV the loop sleeps
until a message or the next lease deadline (`next_deadline_s`). The admission output carries the
first token, which the client already got from the prefill instance: a router drops it.

With tensor parallelism every rank receives the KV of its own heads (pdray/disagg/tp_ranks.py);
a ticket lists all ranks' receivers and is registered on all of them before it is returned. The
request is admitted once rank 0 has its KV and every other rank reports the same; if any rank
fails or expires the ticket, it is revoked on all of them and the policy applies.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdray.config import Role
from pdray.disagg.tp_ranks import ReceiverRank, rank_transport
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import (
    Emit,
    FailureKind,
    HandoffFailed,
    RequestFailed,
    StreamItem,
    collect,
)
from pdray.kv_transfer.base import FailurePolicy, KVTransport, SeqTicket, Ticket
from pdray.kv_transfer.receiver import KVReceiver, TicketState
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams
from pdray.worker.batch import SampledToken
from pdray.worker.tp_group import TensorParallelError

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    ticket: Ticket
    prompt: str | list[int]
    params: SamplingParams
    policy: FailurePolicy


_TP_POLL_S = 0.001  # other decode ranks report complete tickets only when asked


class DecodeWorker:
    def __init__(
        self,
        engine: LLMEngine,
        transport: KVTransport,
        engine_id: str,
        *,
        lease_s: float = 30.0,
        policy: FailurePolicy = FailurePolicy.RECOMPUTE,
        wake: Callable[[], None] | None = None,
    ):
        if engine.config.role is not Role.DECODE:
            raise ValueError("DecodeWorker needs an engine with role='decode'")
        self.engine = engine
        self.lease_s = lease_s
        self.policy = FailurePolicy(policy)
        runner = engine.runner
        spec = rank_transport(transport, runner.tp_group)
        layout = runner.kv_layout
        self.receiver = KVReceiver(runner.kv_cache, layout=layout)
        self.receiver.metrics.transport = transport.kind.value
        self._wake = wake
        self.descriptor = transport.listen(engine_id, runner.kv_cache, self._on_message, layout)
        self.receivers = [self.descriptor]
        self.ranks = runner.tp_group  # the other tensor-parallel ranks, if any
        if self.ranks is not None:
            self.ranks.create("kv", ReceiverRank, spec, engine_id)
            self.receivers += self.ranks.call("describe", target="kv")
        self.transport = transport
        self._generations = itertools.count(1)
        self.pending: dict[str, _Pending] = {}
        # (request_id, generation) complete on rank 0 -> (ticket, handoffs, other ranks done)
        self._rank_done: dict[tuple[str, int], tuple[Ticket, dict, set[int]]] = {}

    def _on_message(self, message, payload) -> None:  # a transport thread
        self.receiver.on_message(message, payload)
        if self._wake is not None:
            self._wake()

    def reserve(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        lease_s: float | None = None,
        policy: FailurePolicy | None = None,
    ) -> Ticket | None:
        """Reserve blocks for a request's prompt KV. None when the cache cannot take it now."""
        reservations = self.engine.reserve_remote(request_id, prompt, params)
        if reservations is None:
            return None
        ticket = Ticket(
            request_id=request_id,
            generation=next(self._generations),
            seqs=[
                SeqTicket(
                    seq_id=r.seq_id,
                    block_table=r.block_table,
                    num_cached_tokens=r.num_cached_tokens,
                )
                for r in reservations
            ],
            deadline_s=time.time() + (self.lease_s if lease_s is None else lease_s),
            receivers=self.receivers,
        )
        self.receiver.expect(ticket)
        if self.ranks is not None:  # every rank must know the ticket before any KV is sent
            self.ranks.call("expect", ticket, target="kv")
        self.pending[request_id] = _Pending(ticket, prompt, params, policy or self.policy)
        return ticket

    def abort(self, request_id: str) -> RequestOutput | None:
        pending = self.pending.pop(request_id, None)
        if pending is not None:
            self._revoke(pending.ticket, "aborted")
        return self.engine.abort_request(request_id)

    def _revoke(self, ticket: Ticket, reason: str) -> None:
        """Stop every rank applying KV of the ticket (before its blocks are freed)."""
        key = (ticket.request_id, ticket.generation)
        self.receiver.revoke(*key, reason)
        if self.ranks is not None:
            self._rank_done.pop(key, None)
            self.ranks.broadcast("revoke", *key, reason, target="kv")

    def step(self, emit: Emit | None = None) -> list[StreamItem] | None:
        """Admit requests whose KV arrived and fail over the others (emitted at once), then run
        one decode step if anything can run. Without `emit`, returns what it emitted."""
        if emit is None:
            return collect(self.step)
        self.poll_transfers(emit)
        if self.engine.scheduler.has_work:
            for output in self.engine.step():
                emit(output.request_id, output)
        return None

    def has_work(self) -> bool:
        return bool(self.pending) or self.engine.scheduler.has_work

    def has_runnable_work(self) -> bool:
        """False while only waiting for KV."""
        return self.engine.scheduler.has_work

    def next_deadline_s(self) -> float | None:
        """The earliest lease deadline (monotonic); soon while other ranks are to be asked."""
        if self._rank_done:
            return time.monotonic() + _TP_POLL_S
        if not self.pending:
            return None
        earliest = min(p.ticket.deadline_s for p in self.pending.values())
        return time.monotonic() + max(0.0, earliest - time.time())

    def poll_transfers(self, emit: Emit) -> None:
        """Admit requests whose KV arrived (their first token is the output), fail over others."""
        for ticket, state, handoffs, error in self._poll_ranks():
            pending = self.pending.get(ticket.request_id)
            if pending is None or pending.ticket.generation != ticket.generation:
                continue
            del self.pending[ticket.request_id]
            if state is TicketState.COMPLETE:
                emit(ticket.request_id, self._admit(ticket, handoffs))
            else:
                self._revoke(ticket, error or state.value)  # other ranks may still hold it live
                self._fail_over(pending, error or state.value, emit)

    def _poll_ranks(self) -> list[tuple[Ticket, TicketState, dict, str | None]]:
        """Rank 0's finished tickets; with other ranks, a complete one waits for theirs."""
        done = self.receiver.poll()
        if self.ranks is None:
            return done
        finished = []
        for ticket, state, handoffs, error in done:
            if state is TicketState.COMPLETE:
                self._rank_done[(ticket.request_id, ticket.generation)] = (ticket, handoffs, set())
            else:
                finished.append((ticket, state, handoffs, error))
        if not self._rank_done:
            return finished
        for rank, reports in enumerate(self.ranks.call("poll", target="kv"), start=1):
            for request_id, generation, state, error in reports:
                waiting = self._rank_done.get((request_id, generation))
                if waiting is None:
                    continue  # rank 0 failed it already (and revoked it everywhere)
                ticket, handoffs, ranks_done = waiting
                if state != TicketState.COMPLETE.value:
                    del self._rank_done[(request_id, generation)]
                    why = f"decode rank {rank}: {error or state}"
                    finished.append((ticket, TicketState(state), handoffs, why))
                else:
                    ranks_done.add(rank)
        for key, (ticket, handoffs, ranks_done) in list(self._rank_done.items()):
            if len(ranks_done) == len(self.receivers) - 1:
                del self._rank_done[key]
                finished.append((ticket, TicketState.COMPLETE, handoffs, None))
        return finished

    def _admit(self, ticket: Ticket, handoffs: dict) -> RequestOutput:
        tokens = []
        for seq in ticket.seqs:
            h = handoffs[seq.seq_id]
            if h.sampler_state is not None:
                self.engine.runner.sampler.import_state(seq.seq_id, h.sampler_state)
            tokens.append(SampledToken(h.first_token_id, h.logprob, h.rank, h.top_logprobs))
        return self.engine.admit_remote(ticket.request_id, tokens)

    def _fail_over(self, pending: _Pending, reason: str, emit: Emit) -> None:
        request_id = pending.ticket.request_id
        self.engine.abort_request(request_id)  # receiver already stopped applying this ticket
        logger.warning("request %s: %s; policy %s", request_id, reason, pending.policy.value)
        if pending.policy is FailurePolicy.RECOMPUTE:
            self.engine.add_request(request_id, pending.prompt, pending.params)
            return
        kind = FailureKind.RETRY if pending.policy is FailurePolicy.RETRY else FailureKind.FAILED
        emit(request_id, RequestFailed(request_id, HandoffFailed(kind, reason)))

    def close(self) -> None:
        try:
            for request_id in list(self.pending):
                self.abort(request_id)
        except TensorParallelError as e:  # a rank is gone: nothing more to tell it
            logger.warning("closing with a lost tensor-parallel rank: %s", e)
        finally:
            self.transport.close()
            self.engine.close()
