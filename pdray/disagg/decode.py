"""A decode engine plus a KV receiver: reserves blocks under leases and continues requests.

Request lifecycle here:
  reserve -> AWAITING_KV (lease) -> KV + Handoff applied -> admitted -> decoding -> finished
                                 -> lease expired / transfer failed -> receiver revoked, blocks
                                    freed -> policy: recompute here | hand back for retry | fail
  abort at any point: receiver revoked first (no copy can still land), then blocks freed.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from pdray.config import Role
from pdray.engine.llm_engine import LLMEngine
from pdray.kv_transfer.base import FailurePolicy, KVTransport, SeqTicket, Ticket
from pdray.kv_transfer.receiver import KVReceiver, TicketState
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams
from pdray.worker.batch import SampledToken

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    ticket: Ticket
    prompt: str | list[int]
    params: SamplingParams
    policy: FailurePolicy


@dataclass
class DecodeEvent:
    """Something the caller must act on: a request to retry elsewhere, or one that failed."""

    request_id: str
    kind: str  # "retry" or "failed"
    reason: str


class DecodeWorker:
    def __init__(
        self,
        engine: LLMEngine,
        transport: KVTransport,
        engine_id: str,
        *,
        lease_s: float = 30.0,
        policy: FailurePolicy = FailurePolicy.RECOMPUTE,
    ):
        if engine.config.role is not Role.DECODE:
            raise ValueError("DecodeWorker needs an engine with role='decode'")
        self.engine = engine
        self.lease_s = lease_s
        self.policy = FailurePolicy(policy)
        self.receiver = KVReceiver(engine.runner.kv_cache)
        self.receiver.metrics.transport = transport.kind.value
        self.descriptor = transport.listen(
            engine_id, engine.runner.kv_cache, self.receiver.on_message
        )
        self.transport = transport
        self._generations = itertools.count(1)
        self.pending: dict[str, _Pending] = {}
        self.events: list[DecodeEvent] = []

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
            receiver=self.descriptor,
        )
        self.receiver.expect(ticket)
        self.pending[request_id] = _Pending(ticket, prompt, params, policy or self.policy)
        return ticket

    def abort(self, request_id: str) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is not None:
            self.receiver.revoke(request_id, pending.ticket.generation, "aborted")
        self.engine.abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        """Admissions (each a request's first token) come back at once, before a decode step
        delays them; otherwise one engine step."""
        return self.poll_transfers() or self.engine.step()

    def has_work(self) -> bool:
        return bool(self.pending) or self.engine.scheduler.has_work

    def has_runnable_work(self) -> bool:
        """False while only waiting for KV: callers should sleep briefly instead of spinning."""
        return self.engine.scheduler.has_work

    def poll_transfers(self) -> list[RequestOutput]:
        """Admit requests whose KV arrived (their first token is the output), fail over others."""
        outputs = []
        for ticket, state, handoffs, error in self.receiver.poll():
            pending = self.pending.pop(ticket.request_id, None)
            if pending is None or pending.ticket.generation != ticket.generation:
                continue
            if state is TicketState.COMPLETE:
                outputs.append(self._admit(ticket, handoffs))
            else:
                outputs += self._fail_over(pending, error or state.value)
        return outputs

    def _admit(self, ticket: Ticket, handoffs: dict) -> RequestOutput:
        tokens = []
        for seq in ticket.seqs:
            h = handoffs[seq.seq_id]
            if h.sampler_state is not None:
                self.engine.runner.sampler.import_state(seq.seq_id, h.sampler_state)
            tokens.append(SampledToken(h.first_token_id, h.logprob, h.rank, h.top_logprobs))
        return self.engine.admit_remote(ticket.request_id, tokens)

    def _fail_over(self, pending: _Pending, reason: str) -> list[RequestOutput]:
        request_id = pending.ticket.request_id
        self.engine.abort_request(request_id)  # receiver already stopped applying this ticket
        logger.warning("request %s: %s; policy %s", request_id, reason, pending.policy.value)
        if pending.policy is FailurePolicy.RECOMPUTE:
            self.engine.add_request(request_id, pending.prompt, pending.params)
            return []
        kind = "retry" if pending.policy is FailurePolicy.RETRY else "failed"
        self.events.append(DecodeEvent(request_id, kind, reason))
        return []

    def close(self) -> None:
        for request_id in list(self.pending):
            self.abort(request_id)
        self.transport.close()
