"""A prefill engine plus a KV sender: computes prompts and streams their KV to decode engines.

Request lifecycle here:  submit(ticket) -> prefill steps (layer-wise KV streaming) -> first token
(emitted at once: the client gets it from here while decode admits the request) -> Handoff ->
flush -> PrefillResult emitted, blocks released. On any error the ticket is aborted toward the
receiver and the blocks are released; the decode side then applies its failure policy.

With tensor parallelism every rank sends the KV of its own heads: the other ranks' senders
(pdray/disagg/tp_ranks.py) get each ticket, each step's plan and each hand-off from here, and the
blocks are released only after every rank's hand-off was acknowledged.
"""

from __future__ import annotations

import logging

from pdray.config import Role
from pdray.disagg.tp_ranks import SenderRank, rank_transport
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import Emit, PrefillResult, StreamItem, collect
from pdray.kv_transfer.base import KVTransport, Ticket, TransferError
from pdray.kv_transfer.sender import KVSender
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


__all__ = ["PrefillResult", "PrefillWorker"]


class PrefillWorker:
    def __init__(self, engine: LLMEngine, transport: KVTransport, flush_timeout_s: float = 30.0):
        if engine.config.role is not Role.PREFILL:
            raise ValueError("PrefillWorker needs an engine with role='prefill'")
        self.engine = engine
        self.transport = transport
        self.flush_timeout_s = flush_timeout_s
        runner = engine.runner
        self.layout = runner.kv_layout
        transport.register(runner.kv_cache, self.layout)
        self.sender = KVSender(transport, runner.kv_cache, layout=self.layout)
        runner.on_layer_kv_written = self.sender.on_layer
        self.ranks = runner.tp_group  # the other tensor-parallel ranks, if any
        spec = rank_transport(transport, self.ranks)
        if self.ranks is not None:
            self.ranks.create("kv", SenderRank, spec)
        self._planned = False
        engine.step_observer = self
        self.tickets: dict[str, Ticket] = {}

    def submit(
        self, request_id: str, prompt, params: SamplingParams, ticket: Ticket | None
    ) -> None:
        """Queue a prompt. With a ticket its KV goes to that decode reservation; without one
        the request only prefills (its output is the first token)."""
        if ticket is not None and not ticket.receiver.layout.compatible_with(self.layout):
            raise ValueError("the decode engine's KV layout differs from this prefill engine's")
        self.engine.add_request(request_id, prompt, params)
        if ticket is not None:
            try:
                self.sender.add_ticket(ticket)
            except Exception:
                self.sender.forget([seq.seq_id for seq in ticket.seqs])
                self.engine.abort_request(request_id)
                raise
            if self.ranks is not None:
                self.ranks.broadcast("add_ticket", ticket, target="kv")
            self.tickets[request_id] = ticket

    def abort(self, request_id: str, reason: str = "aborted by client") -> RequestOutput | None:
        ticket = self.tickets.pop(request_id, None)
        if ticket is not None:
            self.sender.abort(ticket, reason)
            self._forget_on_ranks(ticket)
        return self.engine.abort_request(request_id)

    # -- engine.step_observer: around each forward ----------------------------------------------

    def begin_step(self, scheduled) -> None:
        plan = self.sender.begin_step(scheduled)
        self._planned = bool(plan) and self.ranks is not None
        if self._planned:
            self.ranks.broadcast("set_plan", plan, target="kv")

    def end_step(self) -> None:
        self.sender.end_step()
        if self._planned:
            self.ranks.broadcast("end_step", target="kv")

    def step(self, emit: Emit | None = None) -> list[StreamItem] | None:
        """One prefill forward. Each request that sampled its first token emits that output at
        once (finished=False: decode continues it), then, after its hand-off, a PrefillResult.
        Without `emit`, returns what it emitted."""
        if emit is None:
            return collect(self.step)
        done = [out for out in self.engine.step() if out.finished]
        for out in done:
            out.finished = False
            emit(out.request_id, out)
        for out in done:
            emit(out.request_id, self._hand_off(out))
        return None

    def has_runnable_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def next_deadline_s(self) -> float | None:
        return None

    def _hand_off(self, out: RequestOutput) -> PrefillResult:
        request_id = out.request_id
        ticket = self.tickets.pop(request_id, None)
        try:
            if ticket is not None:
                self._hand_off_all_ranks(ticket, request_id)
            return PrefillResult(request_id, out)
        except (TransferError, OSError) as e:
            logger.warning("KV hand-off of %s failed: %s", request_id, e)
            self.sender.abort(ticket, f"prefill hand-off failed: {e}")
            return PrefillResult(request_id, None, f"KV transfer failed: {e}")
        finally:
            self.engine.release(request_id)

    def _hand_off_all_ranks(self, ticket: Ticket, request_id: str) -> None:
        """Every rank sends its Handoffs and waits for the decode ranks it fed; raises if any
        rank failed. The other ranks run theirs while this one does."""
        sampler = self.engine.runner.sampler
        seqs = [
            (seq.seq_id, token, sampler.export_state(seq.seq_id))
            for seq, token in self.engine.request_seq_states(request_id)
        ]
        if self.ranks is not None:
            self.ranks.broadcast("hand_off", seqs, self.flush_timeout_s, target="kv", reply=True)
        try:
            self.sender.hand_off(seqs, self.flush_timeout_s)
        finally:
            errors = [] if self.ranks is None else [e for e in self.ranks.gather() if e]
        if errors:
            raise TransferError("; ".join(errors))

    def _forget_on_ranks(self, ticket: Ticket) -> None:
        if self.ranks is not None:
            self.ranks.broadcast("forget", [s.seq_id for s in ticket.seqs], target="kv")

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def close(self) -> None:
        for request_id in list(self.tickets):
            self.abort(request_id, "the prefill engine is closing")
        self.transport.close()
        self.engine.close()
