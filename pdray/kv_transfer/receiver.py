"""Decode side of KV transfer: leases on reserved blocks and fenced application of incoming KV.

Ticket state machine (one per reservation, keyed by (request_id, generation)):

  LIVE --all chunks applied + Handoffs-> COMPLETE   (engine thread admits the request)
  LIVE --deadline passed---------------> EXPIRED    (engine thread frees blocks, applies policy)
  LIVE --TransferAbort / revoke--------> FAILED     (same)

Messages for a ticket that is not LIVE (late writes, old generations) are dropped and counted;
`revoke` takes the ticket's lock, so once it returns no copy into its blocks is running or can
start: only then may the engine free them.

A chunk is applied with one gather/scatter (`kernels.kv_copy`) of all its layers, K and V, blocks
and heads, asynchronously on the receiver's side stream on GPU, after its destination blocks were
checked against the ticket's (one vectorised check); its source blocks, layers and heads are
checked against the payload's tensor.

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

import numpy as np
import torch

from pdray.kernels.kv_copy import copy_kv_blocks
from pdray.kv_transfer.base import (
    Handoff,
    KVLayout,
    KVPayload,
    LayerChunk,
    Message,
    Ticket,
    TransferAbort,
    head_slice,
)
from pdray.kv_transfer.metrics import TransferMetrics
from pdray.kv_transfer.payload import block_pairs, check_blocks

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
    allowed_blocks: dict[str, np.ndarray] = field(default_factory=dict)  # seq -> bool mask
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
            allowed = np.zeros(self.kv_cache.shape[2], dtype=bool)
            allowed[np.asarray(seq.block_table[first:], dtype=np.int64)] = True
            entry.allowed_blocks[seq.seq_id] = allowed
            entry.chunks_applied[seq.seq_id] = 0
        with self._lock:
            self._entries[(ticket.request_id, ticket.generation)] = entry

    # -- transport thread ----------------------------------------------------------------------

    def on_message(self, message: Message, payload: KVPayload | None = None) -> None:
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

    def _apply(self, entry: _Entry, message: Message, payload: KVPayload | None) -> None:
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

    def _copy(self, entry: _Entry, chunk: LayerChunk, payload: KVPayload | None) -> None:
        """One gather/scatter of the chunk, after checking it writes only the ticket's blocks."""
        if not isinstance(payload, KVPayload):
            raise ValueError(f"a LayerChunk needs a KVPayload, got {type(payload).__name__}")
        cache = self.kv_cache
        if not 0 <= chunk.layer <= chunk.layer + chunk.num_layers <= cache.shape[0]:
            raise ValueError(f"layers {chunk.layer}+{chunk.num_layers} outside the KV cache")
        head, stop, _ = head_slice(chunk, self.layout).indices(cache.shape[4])
        dst_blocks = block_pairs(chunk.runs, cache.shape[2])[1]
        check_blocks(dst_blocks, cache.shape[2], f"a chunk of {chunk.seq_id}")
        reserved = entry.allowed_blocks[chunk.seq_id][dst_blocks.numpy()]
        if not reserved.all():
            blocks = dst_blocks.numpy()[~reserved].tolist()
            raise ValueError(f"blocks {blocks[:8]} are not reserved for {chunk.seq_id}")
        have = (payload.num_blocks, payload.num_layers, payload.heads[1] - payload.heads[0])
        need = (dst_blocks.numel(), chunk.num_layers, stop - head)
        if have != need:
            raise ValueError(f"the payload holds {have} (blocks, layers, heads); the chunk {need}")
        check_blocks(payload.blocks, payload.kv.shape[2], "the payload")
        ids = torch.from_numpy(np.stack([dst_blocks.numpy(), payload.blocks.numpy()]))  # one upload
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                ids = ids.to(cache.device, non_blocking=True)
                self._scatter(chunk, payload, ids, head)
                payload.kv.record_stream(self._stream)  # a transport's buffer outlives the copy
        else:
            self._scatter(chunk, payload, ids, head)
        entry.num_bytes += payload.num_bytes

    def _scatter(self, chunk: LayerChunk, payload: KVPayload, ids: torch.Tensor, head: int) -> None:
        copy_kv_blocks(
            self.kv_cache, ids[0], payload.kv, ids[1], num_layers=chunk.num_layers,
            dst_layer=chunk.layer, src_layer=payload.layer,
            num_heads=payload.heads[1] - payload.heads[0], dst_head=head,
            src_head=payload.heads[0],
        )  # fmt: skip

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
