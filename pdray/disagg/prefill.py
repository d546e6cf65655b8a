"""A prefill engine plus a KV sender: computes prompts and streams their KV to decode engines.

Request lifecycle here:  submit(ticket) -> prefill steps (layer-wise KV streaming) -> first token
-> Handoff -> flush -> blocks released. On any error the ticket is aborted toward the receiver
and the blocks are released; the decode side then applies its failure policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pdray.config import Role
from pdray.engine.llm_engine import LLMEngine
from pdray.kv_transfer.base import KVTransport, Ticket, TransferError
from pdray.kv_transfer.sender import KVSender
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    request_id: str
    output: RequestOutput | None
    error: str | None = None


class PrefillWorker:
    def __init__(self, engine: LLMEngine, transport: KVTransport, flush_timeout_s: float = 30.0):
        if engine.config.role is not Role.PREFILL:
            raise ValueError("PrefillWorker needs an engine with role='prefill'")
        self.engine = engine
        self.transport = transport
        self.flush_timeout_s = flush_timeout_s
        kv_cache = engine.runner.kv_cache
        transport.register(kv_cache)
        self.sender = KVSender(transport, kv_cache)
        engine.runner.on_layer_kv_written = self.sender.on_layer
        engine.step_observer = self.sender
        self.tickets: dict[str, Ticket] = {}

    def submit(
        self, request_id: str, prompt, params: SamplingParams, ticket: Ticket | None
    ) -> None:
        """Queue a prompt. With a ticket its KV goes to that decode reservation; without one
        the request only prefills (its output is the first token)."""
        if ticket is not None and not ticket.receiver.layout.compatible_with(_layout(self.engine)):
            raise ValueError("the decode engine's KV layout differs from this prefill engine's")
        self.engine.add_request(request_id, prompt, params)
        if ticket is not None:
            try:
                self.sender.add_ticket(ticket)
            except Exception:
                self.engine.abort_request(request_id)
                raise
            self.tickets[request_id] = ticket

    def abort(self, request_id: str, reason: str = "aborted by client") -> None:
        ticket = self.tickets.pop(request_id, None)
        if ticket is not None:
            self.sender.abort(ticket, reason)
        self.engine.abort_request(request_id)

    def step(self) -> list[PrefillResult]:
        results = []
        for out in self.engine.step():
            if out.finished:
                results.append(self._hand_off(out))
        return results

    def _hand_off(self, out: RequestOutput) -> PrefillResult:
        request_id = out.request_id
        ticket = self.tickets.pop(request_id, None)
        try:
            if ticket is not None:
                peer = None
                for seq, token in self.engine.request_seq_states(request_id):
                    state = self.engine.runner.sampler.export_state(seq.seq_id)
                    peer = self.sender.handoff(seq.seq_id, token, state)
                self.sender.flush(peer, self.flush_timeout_s)
            return PrefillResult(request_id, out)
        except (TransferError, OSError) as e:
            logger.warning("KV hand-off of %s failed: %s", request_id, e)
            self.sender.abort(ticket, f"prefill hand-off failed: {e}")
            return PrefillResult(request_id, None, f"KV transfer failed: {e}")
        finally:
            self.engine.release(request_id)

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()


def _layout(engine: LLMEngine):
    from pdray.kv_transfer.base import KVLayout

    return KVLayout.of(engine.runner.kv_cache)
