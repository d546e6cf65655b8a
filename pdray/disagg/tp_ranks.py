"""The KV transfer endpoint of a tensor-parallel engine's other ranks (1..N-1).

Every rank holds the KV of its own KV heads, so every rank sends (prefill) or receives (decode)
its share; rank 0's PrefillWorker or DecodeWorker drives these through the group's command
channel (`TensorParallelGroup.create` / `broadcast` / `call`), in the order it runs its own:

  prefill  add_ticket -> set_plan (each step with sends) -> forward (on_layer sends) -> end_step
           -> hand_off (first token, flush; the error text comes back) | forget (aborted)
  decode   describe (its descriptor) -> expect (before the ticket leaves) -> poll (when rank 0
           has the KV) | revoke (abort, failure: before rank 0 frees the blocks)

A revoke needs no answer: this rank runs commands in order, so it has revoked before it runs
anything that could write those blocks again.
"""

from __future__ import annotations

import contextlib

from pdray.kv_transfer import make_transport
from pdray.kv_transfer.base import Ticket, TransferError, TransportKind
from pdray.kv_transfer.receiver import KVReceiver
from pdray.kv_transfer.sender import KVSender, WirePlan
from pdray.worker.batch import SampledToken


def rank_transport(transport, ranks) -> tuple[str, dict]:
    """What the other ranks make their transport from: the same kind and options."""
    if ranks is not None and transport.kind is TransportKind.LOCAL:
        raise ValueError(
            "the local KV transport cannot reach the other tensor-parallel ranks (they run in "
            "other processes): use ucx or cuda_ipc"
        )
    return transport.spec or (transport.kind.value, {})


def rank_engine_id(engine_id: str, rank: int) -> str:
    """The KV receiver id of decode rank `rank` (rank 0 keeps the engine's id)."""
    return engine_id if rank == 0 else f"{engine_id}/tp{rank}"


class SenderRank:
    def __init__(self, runner, transport_spec: tuple[str, dict]):
        kind, options = transport_spec
        self.transport = make_transport(kind, **options)
        layout = runner.kv_layout
        self.transport.register(runner.kv_cache, layout)
        self.sender = KVSender(self.transport, runner.kv_cache, layout=layout)
        runner.on_layer_kv_written = self.sender.on_layer

    def add_ticket(self, ticket: Ticket) -> None:
        with contextlib.suppress(TransferError):  # kept on the sequences; hand_off reports it
            self.sender.add_ticket(ticket)

    def set_plan(self, wire: WirePlan) -> None:
        self.sender.set_plan(wire)

    def end_step(self) -> None:
        self.sender.end_step()

    def hand_off(
        self, seqs: list[tuple[str, SampledToken, bytes | None]], timeout_s: float
    ) -> str | None:
        """None once this rank's KV of the sequences is on the decode side, else why not."""
        try:
            self.sender.hand_off(seqs, timeout_s)
        except (TransferError, OSError) as e:
            return str(e)
        return None

    def forget(self, seq_ids: list[str]) -> None:
        self.sender.forget(seq_ids)

    def close(self) -> None:
        self.transport.close()


class ReceiverRank:
    def __init__(self, runner, transport_spec: tuple[str, dict], engine_id: str):
        kind, options = transport_spec
        self.transport = make_transport(kind, **options)
        layout = runner.kv_layout
        self.receiver = KVReceiver(runner.kv_cache, layout=layout)
        self.receiver.metrics.transport = kind
        self.descriptor = self.transport.listen(
            rank_engine_id(engine_id, layout.tp_rank), runner.kv_cache,
            self.receiver.on_message, layout,
        )  # fmt: skip

    def describe(self):
        return self.descriptor

    def expect(self, ticket: Ticket) -> None:
        self.receiver.expect(ticket)

    def revoke(self, request_id: str, generation: int, reason: str) -> None:
        self.receiver.revoke(request_id, generation, reason)

    def poll(self) -> list[tuple[str, int, str, str | None]]:
        """(request_id, generation, state, error) of tickets done here since the last poll."""
        return [
            (ticket.request_id, ticket.generation, state.value, error)
            for ticket, state, _, error in self.receiver.poll()
        ]

    def close(self) -> None:
        self.transport.close()
