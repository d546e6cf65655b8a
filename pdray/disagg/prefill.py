"""A prefill engine plus a KV sender: computes prompts and streams their KV to decode engines.

Request lifecycle here:  submit(ticket) -> prefill steps (layer-wise KV streaming) -> first token
(emitted at once: the client gets it from here while decode admits the request) -> Handoff ->
flush -> PrefillResult emitted, blocks released. On any error the ticket is aborted toward the
receiver and the blocks are released; the decode side then applies its failure policy.

A router that reserves on decode while this engine already computes submits with
`ticket_follows=True` and sends the ticket with `attach` when decode answers: a ticket attached
before the last prefill step streams layer by layer as usual (each step's chunks cover every
block not yet sent); one that comes after the first token was sampled finds the request parked
(blocks held), and the next step sends all its layers at once, then hands off. A parked request
whose ticket does not come within `ticket_wait_s` is released with an error, so nothing is held
forever.

Given `wake` (an engine loop's), the hand-off runs off the loop's thread (one hand-off thread:
Handoffs, then the flush), so the next prompts compute while decode acknowledges the KV; the loop
is woken when it is done and then releases the blocks and emits the PrefillResult. A request
aborted meanwhile keeps its blocks until the flush ended (the receiver may still read them). With
tensor parallelism, or without `wake`, the hand-off runs inside the step.

With tensor parallelism every rank sends the KV of its own heads: the other ranks' senders
(pdray/disagg/tp_ranks.py) get each ticket, each step's plan and each hand-off from here, and the
blocks are released only after every rank's hand-off was acknowledged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdray.config import Role
from pdray.disagg.tp_ranks import SenderRank, rank_transport
from pdray.engine.llm_engine import LLMEngine
from pdray.engine.role_worker import Emit, PrefillResult, StreamItem, collect
from pdray.kv_transfer.base import (
    KVDescriptor,
    KVTransport,
    Ticket,
    TransferError,
    gpu_uuid,
    merge_runs,
)
from pdray.kv_transfer.sender import KVSender
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams
from pdray.worker.tp_group import TensorParallelError

logger = logging.getLogger(__name__)


__all__ = ["PrefillResult", "PrefillWorker"]


@dataclass
class _Parked:
    """A request whose first token was sampled before its ticket came: its blocks are held."""

    output: RequestOutput
    deadline_s: float  # time.monotonic()


def sends_after_forward(gpu: str | None, receivers: list[KVDescriptor]) -> bool:
    """Whether a step's KV goes in one chunk after the forward rather than layer by layer as the
    forward writes it: when every receiver's cache is on this engine's GPU (`gpu`, a UUID).

    Two processes on one GPU time-slice it, so each layer's copy in the decode process stalls the
    prefill's forward: on one H200, an 8k prompt's first token came 1.051x later than prefill
    alone when streamed and 1.011x when sent after, and the KV was in place sooner too (1.056x
    against 1.025x; docs/performance.md, "TTFT with layer-wise streaming"). On another GPU the
    copies overlap the forward for free, so streaming stays."""
    return gpu is not None and bool(receivers) and all(r.extra.get("gpu") == gpu for r in receivers)


class PrefillWorker:
    def __init__(
        self,
        engine: LLMEngine,
        transport: KVTransport,
        flush_timeout_s: float = 30.0,
        ticket_wait_s: float = 30.0,
        wake: Callable[[], None] | None = None,
    ):
        if engine.config.role is not Role.PREFILL:
            raise ValueError("PrefillWorker needs an engine with role='prefill'")
        self.engine = engine
        self.transport = transport
        self.flush_timeout_s = flush_timeout_s
        self.ticket_wait_s = ticket_wait_s
        runner = engine.runner
        self.layout = runner.kv_layout
        transport.register(runner.kv_cache, self.layout)
        self.sender = KVSender(transport, runner.kv_cache, layout=self.layout)
        runner.on_layer_kv_written = self.sender.on_layer
        self._gpu = gpu_uuid(runner.kv_cache)
        self._send_after = False  # this step's KV goes in one chunk after the forward
        self.ranks = runner.tp_group  # the other tensor-parallel ranks, if any
        spec = rank_transport(transport, self.ranks)
        if self.ranks is not None:
            self.ranks.create("kv", SenderRank, spec)
        self._planned = False
        engine.step_observer = self
        self.tickets: dict[str, Ticket] = {}
        self.awaiting: set[str] = set()  # submitted with ticket_follows, no ticket yet
        self.parked: dict[str, _Parked] = {}
        self._late: list[str] = []  # parked requests whose ticket came: sent on the next step
        self._early: dict[str, tuple[Ticket, float]] = {}  # attached before submitted
        self._gone: dict[str, float] = {}  # aborted before submitted -> until (monotonic)
        self.handing_off: dict[str, tuple[RequestOutput, Ticket]] = {}  # on the hand-off thread
        self._aborted: set[str] = set()  # aborted while handing off
        self._handoffs = _HandoffThread(wake) if wake is not None and self.ranks is None else None

    def submit(
        self,
        request_id: str,
        prompt,
        params: SamplingParams,
        ticket: Ticket | None,
        *,
        ticket_follows: bool = False,
    ) -> None:
        """Queue a prompt. With a ticket its KV goes to that decode reservation; with
        `ticket_follows` the ticket comes later through `attach`; with neither the request only
        prefills (its output is the first token)."""
        if ticket_follows and self.ranks is not None:
            raise ValueError("ticket_follows needs a prefill engine without tensor parallelism")
        if self._gone.pop(request_id, 0.0) > time.monotonic():
            raise RuntimeError(f"request {request_id} was aborted before it arrived")
        self.engine.add_request(request_id, prompt, params)
        if ticket is not None:
            try:
                self._add_ticket(request_id, ticket)
            except Exception:
                self.engine.abort_request(request_id)
                raise
        elif ticket_follows:
            self.awaiting.add(request_id)
            early = self._early.pop(request_id, None)
            if early is not None:
                self.attach(request_id, early[0])

    def _add_ticket(self, request_id: str, ticket: Ticket) -> None:
        if not ticket.receiver.layout.compatible_with(self.layout):
            raise ValueError("the decode engine's KV layout differs from this prefill engine's")
        try:
            self.sender.add_ticket(ticket)
        except Exception:
            self.sender.forget([seq.seq_id for seq in ticket.seqs])
            raise
        if self.ranks is not None:
            self.ranks.broadcast("add_ticket", ticket, target="kv")
        self.tickets[request_id] = ticket

    def attach(self, request_id: str, ticket: Ticket) -> bool:
        """The ticket of a request submitted with `ticket_follows`. False if the request is gone
        (aborted, or released after waiting too long): decode's lease then frees its blocks."""
        if request_id not in self.awaiting and request_id not in self.parked:
            if request_id in self.engine.requests or request_id in self.tickets:
                return False  # it has a ticket already
            # The ticket overtook the submit (two calls to this replica): keep it a while.
            now_s = time.monotonic()
            self._early = {k: v for k, v in self._early.items() if v[1] > now_s}
            self._early[request_id] = (ticket, now_s + self.ticket_wait_s)
            return True
        self.awaiting.discard(request_id)
        try:
            self._add_ticket(request_id, ticket)
        except TransferError as e:  # the hand-off reports it and tells decode
            logger.warning("KV receiver of %s unreachable: %s", request_id, e)
            self.tickets[request_id] = ticket
        if request_id in self.parked:
            self._late.append(request_id)
        return True

    def abort(self, request_id: str, reason: str = "aborted by client") -> RequestOutput | None:
        if request_id in self.handing_off:  # released once the flush has ended
            self._aborted.add(request_id)
            return None
        if request_id not in self.engine.requests:  # the abort overtook the submit (two calls)
            now_s = time.monotonic()
            self._gone = {k: t for k, t in self._gone.items() if t > now_s}
            self._gone[request_id] = now_s + self.ticket_wait_s
        self.awaiting.discard(request_id)
        if self.parked.pop(request_id, None) is not None:
            self.engine.release(request_id)
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
        receivers = self.sender.planned_receivers()
        self._send_after = self.ranks is None and sends_after_forward(self._gpu, receivers)
        stream = None if self._send_after else self.sender.on_layer
        self.engine.runner.on_layer_kv_written = stream

    def end_step(self) -> None:
        if self._send_after:
            self.sender.on_layer(0, self.layout.num_layers)
        self.sender.end_step()
        if self._planned:
            self.ranks.broadcast("end_step", target="kv")

    def step(self, emit: Emit | None = None) -> list[StreamItem] | None:
        """One prefill forward. Each request that sampled its first token emits that output at
        once (finished=False: decode continues it), then, after its hand-off, a PrefillResult.
        Without `emit`, returns what it emitted."""
        if emit is None:
            return collect(self.step)
        self._finish_handoffs(emit)
        self._send_late(emit)
        self._expire_parked(emit)
        if not self.engine.scheduler.has_work:
            return None
        done = [out for out in self.engine.step() if out.finished]
        for out in done:
            out.finished = False
            emit(out.request_id, out)
        for out in done:
            if out.request_id in self.awaiting:  # its ticket has not come yet: hold the blocks
                self.awaiting.discard(out.request_id)
                deadline_s = time.monotonic() + self.ticket_wait_s
                self.parked[out.request_id] = _Parked(out, deadline_s)
            else:
                self._hand_off_or_start(out, emit)
        return None

    def _hand_off_or_start(self, out: RequestOutput, emit: Emit) -> None:
        ticket = self.tickets.get(out.request_id)
        if self._handoffs is None or ticket is None:
            emit(out.request_id, self._hand_off(out))
            return
        del self.tickets[out.request_id]
        seqs = self._handoff_seqs(out.request_id)
        self.handing_off[out.request_id] = (out, ticket)
        self._handoffs.submit(
            out.request_id, lambda: self.sender.hand_off(seqs, self.flush_timeout_s)
        )

    def _finish_handoffs(self, emit: Emit) -> None:
        if self._handoffs is None:
            return
        for request_id, error in self._handoffs.finished():
            out, ticket = self.handing_off.pop(request_id)
            result = PrefillResult(request_id, out)
            if error is not None:
                logger.warning("KV hand-off of %s failed: %s", request_id, error)
                self.sender.abort(ticket, f"prefill hand-off failed: {error}")
                result = PrefillResult(request_id, None, f"KV transfer failed: {error}")
            self.engine.release(request_id)
            if request_id in self._aborted:
                self._aborted.discard(request_id)
            else:
                emit(request_id, result)

    def _send_late(self, emit: Emit) -> None:
        """Parked requests whose ticket came: every layer of their prompt blocks in one chunk,
        then the hand-off."""
        late, self._late = self._late, []
        for request_id in late:
            parked = self.parked.pop(request_id, None)
            ticket = self.tickets.get(request_id)
            if parked is None or ticket is None:
                continue
            wire = []
            block_size = self.layout.block_size
            num_blocks = -(-len(parked.output.prompt_token_ids) // block_size)
            for seq in ticket.seqs:
                table = self.engine.held_block_table(seq.seq_id)
                start, end = seq.num_cached_tokens // block_size, num_blocks
                runs = merge_runs(table[start:end], seq.block_table[start:end])
                wire.append((seq.seq_id, [(r.src, r.dst, r.num_blocks) for r in runs], end))
            self.sender.set_plan(wire)
            self.sender.on_layer(0, self.layout.num_layers)
            self.sender.end_step()
            self._hand_off_or_start(parked.output, emit)

    def _expire_parked(self, emit: Emit) -> None:
        now_s = time.monotonic()
        for request_id, parked in list(self.parked.items()):
            if now_s > parked.deadline_s and request_id not in self._late:
                del self.parked[request_id]
                self.engine.release(request_id)
                why = f"no decode ticket came within ticket_wait_s={self.ticket_wait_s:g} s"
                emit(request_id, PrefillResult(request_id, None, why))

    def has_runnable_work(self) -> bool:
        done = self._handoffs is not None and self._handoffs.has_finished()
        return self.engine.scheduler.has_work or bool(self._late) or done

    def next_deadline_s(self) -> float | None:
        return min((p.deadline_s for p in self.parked.values()), default=None)

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
        seqs = self._handoff_seqs(request_id)
        if self.ranks is not None:
            self.ranks.broadcast("hand_off", seqs, self.flush_timeout_s, target="kv", reply=True)
        try:
            self.sender.hand_off(seqs, self.flush_timeout_s)
        finally:
            errors = [] if self.ranks is None else [e for e in self.ranks.gather() if e]
        if errors:
            raise TransferError("; ".join(errors))

    def _handoff_seqs(self, request_id: str) -> list:
        """(seq_id, first token, sampler state) of each sequence of a request."""
        sampler = self.engine.runner.sampler
        return [
            (seq.seq_id, token, sampler.export_state(seq.seq_id))
            for seq, token in self.engine.request_seq_states(request_id)
        ]

    def _forget_on_ranks(self, ticket: Ticket) -> None:
        if self.ranks is not None:
            self.ranks.broadcast("forget", [s.seq_id for s in ticket.seqs], target="kv")

    def has_work(self) -> bool:
        return self.engine.scheduler.has_work or bool(self.parked) or bool(self.handing_off)

    def close(self) -> None:
        try:
            for request_id in list(self.tickets):
                self.abort(request_id, "the prefill engine is closing")
        except TensorParallelError as e:  # a rank is gone: nothing more to tell it
            logger.warning("closing with a lost tensor-parallel rank: %s", e)
        finally:
            if self._handoffs is not None:
                self._handoffs.close(self.flush_timeout_s)
            self.transport.close()
            self.engine.close()


class _HandoffThread:
    """Runs hand-offs (send the Handoffs, wait for the flush) one after another off the engine
    loop's thread; each finished one is queued and wakes the loop."""

    def __init__(self, wake: Callable[[], None]):
        self._wake = wake
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kv-handoff")
        self._thread.start()

    def submit(self, request_id: str, hand_off: Callable[[], None]) -> None:
        self._jobs.put((request_id, hand_off))

    def has_finished(self) -> bool:
        return not self._finished.empty()

    def finished(self) -> list[tuple[str, str | None]]:
        """(request_id, error or None) of the hand-offs that ended since the last call."""
        done = []
        while not self._finished.empty():
            done.append(self._finished.get_nowait())
        return done

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            request_id, hand_off = job
            error = None
            try:
                hand_off()
            except Exception as e:  # TransferError, OSError: the peer is gone or too slow
                error = str(e)
            self._finished.put((request_id, error))
            self._wake()

    def close(self, timeout_s: float) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)
