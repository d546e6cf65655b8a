"""Prefill side of KV transfer: streams each layer's new KV blocks while the forward runs.

Per ticketed sequence:  add_ticket -> (each step) begin_step -> on_layer x num_layers -> end_step
                        -> hand_off (first token, after every chunk; flushed) -> engine releases.
Blocks already on the decode side (its prefix hits) are never sent. Only full blocks are sent
until the step that completes the prompt, which also sends the partial last block, so no block
is sent twice. On GPU a layer's chunk is sent from a thread once a CUDA event says it is written,
so the transfer overlaps the rest of the forward; layers already written when the thread gets to
them travel in one chunk (one header, one gather/scatter on the receiver for all of them). A
chunk's payload is the sender's cache with the step's source block ids (`cache_payload`), built
once per step.

A sender is one rank of a prefill engine. Its chunks carry the KV heads it sends to each decode
rank (`kv_routes` of its layout); on the other ranks of a tensor-parallel engine the step's plan
comes from rank 0 (`plan` there, `set_plan` here), since only rank 0 schedules.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from pdray.engine.scheduler import ScheduledSeq
from pdray.kv_transfer.base import (
    Handoff,
    KVDescriptor,
    KVLayout,
    KVTransport,
    LayerChunk,
    SeqTicket,
    Ticket,
    TransferAbort,
    TransferError,
    kv_routes,
    merge_runs,
    num_senders,
)
from pdray.kv_transfer.metrics import TransferMetrics
from pdray.kv_transfer.payload import block_pairs, cache_payload
from pdray.worker.batch import SampledToken

logger = logging.getLogger(__name__)

_RETRY_CONNECT_S = 5.0


@dataclass
class _SeqSend:
    ticket: Ticket
    seq_ticket: SeqTicket
    routes: list[tuple[KVDescriptor, tuple[int, int]]]  # (a decode rank, KV heads it gets)
    sent_upto: int  # blocks [0, sent_upto) are on the decode side
    num_chunks: int = 0
    error: str | None = None


@dataclass
class _Planned:
    state: _SeqSend
    runs: list[tuple[int, int, int]]  # (src_block, dst_block, num_blocks), merged once per step
    end: int
    src_blocks: torch.Tensor  # the runs' source blocks in block_pairs order (int64, CPU)


# A step's plan as it crosses to the other ranks: (seq_id, runs, end) per sequence.
WirePlan = list[tuple[str, list[tuple[int, int, int]], int]]


@dataclass
class _Layers:
    plan: list[_Planned]  # the step's plan (one list object per step)
    layer: int
    num_layers: int
    event: torch.cuda.Event | None  # recorded after the layers' KV was written; None on CPU


class KVSender:
    def __init__(
        self,
        transport: KVTransport,
        kv_cache: torch.Tensor,
        metrics: TransferMetrics | None = None,
        layout: KVLayout | None = None,
    ):
        self.transport = transport
        self.kv_cache = kv_cache
        self.layout = layout or KVLayout.of(kv_cache)
        self.block_size = kv_cache.shape[3]
        self.metrics = metrics or TransferMetrics(transport=transport.kind.value)
        self._seqs: dict[str, _SeqSend] = {}
        self._unreachable: dict[str, float] = {}  # receiver address -> retry connecting after
        self._plan: list[_Planned] = []
        self._cpu_layers: tuple[int, int] | None = None  # CPU: [first, stop) written this step
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._send_loop, daemon=True, name="kv-sender").start()

    def add_ticket(self, ticket: Ticket) -> None:
        """Connect to the decode ranks this rank sends to. On TransferError the ticket's
        sequences are still tracked (other ranks may send them) and fail at hand-off."""
        routes = [(ticket.receivers[rank], heads)
                  for rank, heads in kv_routes(self.layout, len(ticket.receivers))]  # fmt: skip
        error = None
        try:
            for peer, _ in routes:
                self._connect(peer)
        except TransferError as e:
            error = str(e)
        for seq in ticket.seqs:
            first = seq.num_cached_tokens // self.block_size
            self._seqs[seq.seq_id] = _SeqSend(ticket, seq, routes, first, error=error)
        if error is not None:
            raise TransferError(error)

    def _connect(self, peer) -> None:
        if time.monotonic() < self._unreachable.get(peer.address, 0.0):
            raise TransferError(f"KV receiver {peer.engine_id} at {peer.address} was unreachable "
                                f"less than {_RETRY_CONNECT_S:g} s ago")  # fmt: skip
        try:
            self.transport.connect(peer)  # no-op while the link is up; else reconnects
        except TransferError:  # do not stall every request on a dead peer's connect timeout
            self._unreachable[peer.address] = time.monotonic() + _RETRY_CONNECT_S
            raise

    # -- during a step -------------------------------------------------------------------------

    def begin_step(self, scheduled: list[ScheduledSeq]) -> WirePlan:
        """Plan this step's sends; returns the plan for the other ranks (`set_plan`)."""
        wire: WirePlan = []
        for item in scheduled:
            state = self._seqs.get(item.seq.seq_id)
            if state is None:
                continue
            seq = item.seq
            if item.samples:
                end = -(-seq.num_prompt_tokens // self.block_size)
            else:
                end = (seq.num_computed_tokens + item.num_new_tokens) // self.block_size
            if end > state.sent_upto:
                start, dst_table = state.sent_upto, state.seq_ticket.block_table
                runs = merge_runs(seq.block_table[start:end], dst_table[start:end])
                wire.append((seq.seq_id, [(r.src, r.dst, r.num_blocks) for r in runs], end))
        self.set_plan(wire)
        return wire

    def planned_receivers(self) -> list[KVDescriptor]:
        """The decode ranks this step's plan sends to."""
        return [peer for p in self._plan for peer, _ in p.state.routes]

    def set_plan(self, wire: WirePlan) -> None:
        num_blocks = self.kv_cache.shape[2]
        self._plan = [
            _Planned(self._seqs[seq_id], runs, end, block_pairs(runs, num_blocks)[0])
            for seq_id, runs, end in wire
            if seq_id in self._seqs
        ]

    def on_layer(self, layer: int, num_layers: int = 1) -> None:
        """Layers [layer, layer + num_layers) of this step are written (queued on the stream)."""
        if not self._plan:
            return
        if not self.kv_cache.is_cuda:  # the forward runs on this thread: all at the end
            first = layer if self._cpu_layers is None else self._cpu_layers[0]
            self._cpu_layers = (first, layer + num_layers)
            return
        event = torch.cuda.Event()
        event.record()
        self._queue.put(_Layers(self._plan, layer, num_layers, event))

    def end_step(self) -> None:
        if self._cpu_layers is not None:  # one chunk of every layer, sent off this thread
            first, stop = self._cpu_layers
            self._cpu_layers = None
            self._queue.put(_Layers(self._plan, first, stop - first, None))
        for p in self._plan:
            p.state.sent_upto = p.end
        self._plan = []

    # -- after the first token -----------------------------------------------------------------

    def hand_off(
        self, seqs: list[tuple[str, SampledToken, bytes | None]], timeout_s: float
    ) -> None:
        """Send each sequence's first token and sampler state to the decode ranks this rank fed,
        then wait until they have everything (its blocks may be reused after that). Raises
        TransferError if any of it failed; the sequences are forgotten either way."""
        states = [(self._seqs.pop(seq_id, None), seq_id, token, st) for seq_id, token, st in seqs]
        self._drain(timeout_s)  # every chunk of these sequences has been handed to the transport
        peers: dict[str, None] = {}
        for state, seq_id, token, sampler_state in states:
            if state is None:
                raise TransferError(f"no KV transfer of {seq_id} is known on this rank")
            if state.error is not None:
                raise TransferError(f"sending KV of {seq_id} failed: {state.error}")
            ticket = state.ticket
            for peer, _ in state.routes:
                message = Handoff(
                    request_id=ticket.request_id, generation=ticket.generation, seq_id=seq_id,
                    num_chunks=state.num_chunks, sender_rank=self.layout.tp_rank,
                    num_senders=num_senders(self.layout.tp_size, peer.layout),
                    first_token_id=token.token_id, logprob=token.logprob, rank=token.rank,
                    top_logprobs=token.top_logprobs, sampler_state=sampler_state,
                )  # fmt: skip
                self.transport.send(peer.engine_id, message, None)
                peers[peer.engine_id] = None
        for peer_id in peers:
            self.transport.flush(peer_id, timeout_s)

    def forget(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self._seqs.pop(seq_id, None)

    def abort(self, ticket: Ticket, reason: str) -> None:
        """Forget the ticket and tell decode rank 0, which fails it on every decode rank."""
        self.forget([seq.seq_id for seq in ticket.seqs])
        message = TransferAbort(
            request_id=ticket.request_id, generation=ticket.generation, reason=reason
        )
        try:
            self.transport_send_now(ticket.receiver.engine_id, message)
        except Exception as e:  # the peer may be gone; its lease expires anyway
            logger.warning("could not tell %s about the abort: %s", ticket.receiver.engine_id, e)

    def transport_send_now(self, peer_id: str, message, timeout_s: float = 30.0) -> None:
        """Send a control message after everything queued before it (order per peer kept)."""
        self._drain(timeout_s)
        self.transport.send(peer_id, message, None)

    def _drain(self, timeout_s: float) -> None:
        """Wait until the sender thread has handed every queued chunk to the transport."""
        done = self._queue.all_tasks_done
        with done:
            if not done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout_s):
                raise TransferError(
                    f"the KV sender thread did not send its queued chunks within {timeout_s:g} s"
                )

    def _send_layers(self, plan: list[_Planned], layer: int, num_layers: int) -> None:
        for p in plan:
            ticket = p.state.ticket
            p.state.num_chunks += num_layers
            for peer, heads in p.state.routes:
                chunk = LayerChunk.model_construct(  # our own values: no validation per send
                    request_id=ticket.request_id, generation=ticket.generation,
                    seq_id=p.state.seq_ticket.seq_id, layer=layer, num_layers=num_layers,
                    runs=p.runs, kv_heads=heads,
                )  # fmt: skip
                self.metrics.chunks_sent += 1
                try:
                    payload = cache_payload(self.kv_cache, chunk, self.layout, p.src_blocks)
                    self.metrics.bytes_sent += payload.num_bytes
                    self.transport.send(peer.engine_id, chunk, payload)
                except Exception as e:  # never break the forward: the hand-off reports it
                    self._failed(p.state, peer.engine_id, e)

    def _failed(self, state: _SeqSend, peer_id: str, error: Exception) -> None:
        self.metrics.failures += 1
        if state.error is None:
            state.error = f"{type(error).__name__}: {error}"
            logger.warning("KV send to %s failed: %s", peer_id, error)

    def _send_loop(self) -> None:
        """Sends each layer once its event fired, together with the following layers of the same
        step that are already written: one message for a run of ready layers."""
        pending: _Layers | None = None
        while True:
            first = pending or self._queue.get()
            pending, num_layers, count = None, first.num_layers, 1
            try:
                if first.event is not None:
                    first.event.synchronize()
                while pending is None:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    count += 1
                    follows = item.plan is first.plan and item.layer == first.layer + num_layers
                    if follows and (item.event is None or item.event.query()):
                        num_layers += item.num_layers
                    else:
                        pending, count = item, count - 1
                self._send_layers(first.plan, first.layer, num_layers)
            finally:
                for _ in range(count):
                    self._queue.task_done()
