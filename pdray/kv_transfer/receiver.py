"""Decode side of KV transfer: leases on reserved blocks and fenced application of incoming KV.

Ticket state machine (one per reservation, keyed by (request_id, generation)):

  LIVE --all chunks applied + Handoffs-> COMPLETE   (engine thread admits the request)
  LIVE --deadline passed---------------> EXPIRED    (engine thread frees blocks, applies policy)
  LIVE --TransferAbort / revoke--------> FAILED     (same)

Messages for a ticket that is not LIVE (late writes, old generations) are dropped and counted;
`revoke` takes the ticket's lock, so once it returns no copy into its blocks is running or can
start: only then may the engine free them.

A receiver is one rank of a decode engine. A sequence's KV may come from several prefill ranks
(tensor parallelism): each sends its own Handoff, counting its chunks and the number of senders;
the sequence is complete when all of them arrived and every chunk they count was applied. A
Handoff ends its sender's writes: the copies are waited for before the sender is acknowledged,
so it may reuse its blocks.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from pdray.kv_transfer.base import (
    Handoff,
    KVLayout,
    LayerChunk,
    Message,
    Ticket,
    TransferAbort,
    head_slice,
)
from pdray.kv_transfer.metrics import TransferMetrics

logger = logging.getLogger(__name__)


class TicketState(enum.Enum):
    LIVE = "live"
    COMPLETE = "complete"
    EXPIRED = "expired"
    FAILED = "failed"


@dataclass
class _Entry:
    ticket: Ticket
    state: TicketState = TicketState.LIVE
    allowed_blocks: dict[str, set[int]] = field(default_factory=dict)
    chunks_applied: dict[str, int] = field(default_factory=dict)
    handoffs: dict[str, dict[int, Handoff]] = field(default_factory=dict)  # seq -> sender rank
    error: str | None = None
    num_bytes: int = 0
    start_s: float = field(default_factory=time.monotonic)


class KVReceiver:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        metrics: TransferMetrics | None = None,
        layout: KVLayout | None = None,
    ):
        self.kv_cache = kv_cache
        self.layout = layout or KVLayout.of(kv_cache)
        self.metrics = metrics or TransferMetrics()
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._ready: list[_Entry] = []
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None

    def expect(self, ticket: Ticket) -> None:
        entry = _Entry(ticket)
        for seq in ticket.seqs:
            first = seq.num_cached_tokens // self.kv_cache.shape[3]
            entry.allowed_blocks[seq.seq_id] = set(seq.block_table[first:])
            entry.chunks_applied[seq.seq_id] = 0
        with self._lock:
            self._entries[(ticket.request_id, ticket.generation)] = entry

    # -- transport thread ----------------------------------------------------------------------

    def on_message(self, message: Message, payload: list[torch.Tensor]) -> None:
        key = (message.request_id, message.generation)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.state is TicketState.LIVE:
                self._expire_if_due(entry, time.time())
            if entry is None or entry.state is not TicketState.LIVE:
                self.metrics.dropped_messages += 1
                logger.debug("dropped %s for %s: no live ticket", type(message).__name__, key)
                return
            try:
                self._apply(entry, message, payload)
            except Exception as e:  # a bad message fails its ticket, never the receiver
                self._wait_copies()
                entry.state, entry.error = TicketState.FAILED, f"bad transfer: {e}"
                self._ready.append(entry)

    def _apply(self, entry: _Entry, message: Message, payload: list[torch.Tensor]) -> None:
        if isinstance(message, TransferAbort):
            self._wait_copies()
            entry.state, entry.error = TicketState.FAILED, message.reason
            self._ready.append(entry)
            return
        if isinstance(message, Handoff):
            self._wait_copies()  # the sender may reuse its blocks once acknowledged
            entry.handoffs.setdefault(message.seq_id, {})[message.sender_rank] = message
        else:
            self._copy(entry, message, payload)
            entry.chunks_applied[message.seq_id] += message.num_layers
        if self._complete(entry):
            self._wait_copies()  # the KV is in place before anyone is told it is
            entry.state = TicketState.COMPLETE
            self._ready.append(entry)

    def _wait_copies(self) -> None:
        """Copies run asynchronously on a side stream; wait for them (completion, revoke, expiry)."""
        if self._stream is not None:
            self._stream.synchronize()

    def _copy(self, entry: _Entry, chunk: LayerChunk, payload: list[torch.Tensor]) -> None:
        allowed = entry.allowed_blocks[chunk.seq_id]
        if len(payload) != len(chunk.runs):
            raise ValueError(f"{len(payload)} payload tensors for {len(chunk.runs)} runs")
        if not 0 <= chunk.layer <= chunk.layer + chunk.num_layers <= self.kv_cache.shape[0]:
            raise ValueError(f"layers {chunk.layer}+{chunk.num_layers} outside the KV cache")
        for _, dst, n in chunk.runs:
            if not allowed.issuperset(range(dst, dst + n)):
                raise ValueError(f"blocks {dst}..{dst + n - 1} are not reserved for {chunk.seq_id}")
        layers = slice(chunk.layer, chunk.layer + chunk.num_layers)
        heads = head_slice(chunk, self.layout)
        if self._stream is None:
            for (_, dst, n), src in zip(chunk.runs, payload, strict=True):
                self.kv_cache[layers, :, dst : dst + n, :, heads].copy_(src)
        else:
            from kernels.run_copy import copy_run

            with torch.cuda.stream(self._stream):
                for (_, dst, n), src in zip(chunk.runs, payload, strict=True):
                    copy_run(self.kv_cache[layers, :, dst : dst + n, :, heads], src)
                    src.record_stream(self._stream)  # a transport's buffer outlives the copy
        entry.num_bytes += sum(src.nbytes for src in payload)

    def _complete(self, entry: _Entry) -> bool:
        if len(entry.handoffs) != len(entry.ticket.seqs):
            return False
        for seq_id, by_sender in entry.handoffs.items():
            any_handoff = next(iter(by_sender.values()))
            if len(by_sender) != any_handoff.num_senders:
                return False
            if entry.chunks_applied[seq_id] != sum(h.num_chunks for h in by_sender.values()):
                return False
        return True

    # -- engine thread ---------------------------------------------------------------------------

    def poll(
        self, now_s: float | None = None
    ) -> list[tuple[Ticket, TicketState, dict, str | None]]:
        """Tickets that completed, failed or expired since the last poll (each reported once).

        For COMPLETE the dict maps seq_id -> Handoff (prefill rank 0's, which all senders copy the
        first token from); expired tickets are revoked here.
        """
        now_s = time.time() if now_s is None else now_s
        with self._lock:
            for entry in self._entries.values():
                if entry.state is TicketState.LIVE:
                    self._expire_if_due(entry, now_s)
            reported = []
            for entry in self._ready:
                key = (entry.ticket.request_id, entry.ticket.generation)
                if self._entries.pop(key, None) is entry:  # not revoked meanwhile
                    self._record(entry)
                    reported.append(entry)
            self._ready = []
        return [(e.ticket, e.state, _first_token_handoffs(e), e.error) for e in reported]

    def _expire_if_due(self, entry: _Entry, now_s: float) -> None:
        if now_s > entry.ticket.deadline_s:
            self._wait_copies()
            entry.state, entry.error = TicketState.EXPIRED, "KV transfer lease expired"
            self._ready.append(entry)

    def revoke(self, request_id: str, generation: int, reason: str = "revoked") -> bool:
        """Stop accepting KV for a ticket. After this returns its blocks may be freed."""
        with self._lock:
            entry = self._entries.pop((request_id, generation), None)
            if entry is None:
                return False
            entry.state, entry.error = TicketState.FAILED, reason
            self._wait_copies()
            self._record(entry)
            return True

    def _record(self, entry: _Entry) -> None:
        m = self.metrics
        if entry.state is TicketState.COMPLETE:
            m.completed += 1
            m.bytes_received += entry.num_bytes
            m.transfer_time_s += time.monotonic() - entry.start_s
        elif entry.state is TicketState.EXPIRED:
            m.expired_leases += 1
        else:
            m.failures += 1

    @property
    def num_live(self) -> int:
        with self._lock:
            return len(self._entries)


def _first_token_handoffs(entry: _Entry) -> dict[str, Handoff]:
    return {seq_id: by_sender[min(by_sender)] for seq_id, by_sender in entry.handoffs.items()}
