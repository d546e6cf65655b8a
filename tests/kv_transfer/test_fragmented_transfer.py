"""Fragmented block tables end to end (CPU): KVSender -> transport -> KVReceiver moves a prompt's
KV into decode blocks that are every other block, reversed or shuffled, one gather/scatter per
chunk whatever the fragmentation, over `local` and `ucx`, and re-sharded between tensor-parallel
sizes (source heads != destination heads). The decode KV equals the prefill KV, nothing else is
written, and bytes received equal bytes sent."""

from __future__ import annotations

import importlib.util
import itertools
import random
import threading
import time

import pytest
import torch
from disagg_harness import poll_until_done

import pdray.kv_transfer.receiver as receiver_module
from pdray.kv_transfer.base import (
    KVLayout,
    LayerChunk,
    SeqTicket,
    Ticket,
    TransferAbort,
    merge_runs,
)
from pdray.kv_transfer.local import LocalTransport
from pdray.kv_transfer.payload import block_pairs, cache_payload
from pdray.kv_transfer.receiver import KVReceiver, TicketState
from pdray.kv_transfer.sender import KVSender
from pdray.worker.batch import SampledToken

LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 3, 40, 4, 8
NUM_PROMPT_BLOCKS = 12
_ids = itertools.count()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),  # fmt: skip
]


def _tables(kind: str) -> tuple[list[int], list[int]]:
    """(prefill block table, decode block table) of one prompt."""
    rng = random.Random(kind)
    src = rng.sample(range(BLOCKS), NUM_PROMPT_BLOCKS)  # a prefill engine's scattered blocks
    if kind == "every_other":
        dst = list(range(1, 2 * NUM_PROMPT_BLOCKS, 2))
    elif kind == "reversed":  # engines free blocks in reverse: tables descend
        dst = list(range(30, 30 - NUM_PROMPT_BLOCKS, -1))
        src = sorted(src, reverse=True)
    elif kind == "shuffled":
        dst = rng.sample(range(BLOCKS), NUM_PROMPT_BLOCKS)
    else:
        dst, src = list(range(5, 5 + NUM_PROMPT_BLOCKS)), list(range(NUM_PROMPT_BLOCKS))
    return src, dst


def _cache(heads: int, seed: int | None = None, device: str = "cpu") -> torch.Tensor:
    shape = (LAYERS, 2, BLOCKS, BLOCK_SIZE, heads, HEAD_DIM)
    if seed is None:
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device, torch.bfloat16)


def _ticket(receivers, dst_table: list[int]) -> Ticket:
    request_id = f"frag-{next(_ids)}"
    seq = SeqTicket(seq_id=f"{request_id}-0", block_table=dst_table, num_cached_tokens=0)
    return Ticket(request_id=request_id, generation=1, seqs=[seq], deadline_s=time.time() + 60,
                  receivers=receivers)  # fmt: skip


def _stream(sender: KVSender, ticket: Ticket, src_table: list[int]) -> None:
    """What a prefill engine does: two steps of blocks (layer by layer, then all layers at
    once), then the hand-off."""
    seq = ticket.seqs[0]
    sender.add_ticket(ticket)
    half = NUM_PROMPT_BLOCKS // 2
    for start, end, per_layer in ((0, half, True), (half, NUM_PROMPT_BLOCKS, False)):
        runs = merge_runs(src_table[start:end], seq.block_table[start:end])
        sender.set_plan([(seq.seq_id, [(r.src, r.dst, r.num_blocks) for r in runs], end)])
        if per_layer:
            for layer in range(LAYERS):
                sender.on_layer(layer)
        else:
            sender.on_layer(0, LAYERS)
        sender.end_step()
    sender.hand_off([(seq.seq_id, SampledToken(7), None)], timeout_s=20)


@pytest.fixture
def scatters(monkeypatch) -> list:
    """The receiver's gather/scatter calls (one per chunk message)."""
    calls: list = []
    copy = receiver_module.copy_kv_blocks

    def counted(*args, **kwargs):
        calls.append(args[1].numel())
        copy(*args, **kwargs)

    monkeypatch.setattr(receiver_module, "copy_kv_blocks", counted)
    return calls


def _check(decode_cache, prefill_cache, src_table, dst_table, heads=slice(None)) -> None:
    for src, dst in zip(src_table, dst_table, strict=True):
        assert torch.equal(decode_cache[:, :, dst], prefill_cache[:, :, src, :, heads])
    untouched = sorted(set(range(BLOCKS)) - set(dst_table))
    assert not decode_cache[:, :, untouched].any(), "blocks outside the ticket were written"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["contiguous", "every_other", "reversed", "shuffled"])
def test_local_fragmented_decode_table(kind, device, scatters):
    """On GPU: the sender's thread sends each chunk once its event fired; the receiver scatters
    on its side stream (one Triton launch per chunk)."""
    src_table, dst_table = _tables(kind)
    prefill_cache, decode_cache = _cache(2, seed=1, device=device), _cache(2, device=device)
    receiver = KVReceiver(decode_cache)
    rx, tx = LocalTransport(), LocalTransport()
    descriptor = rx.listen(f"decode-frag-{next(_ids)}", decode_cache, receiver.on_message)
    sender = KVSender(tx, prefill_cache)
    ticket = _ticket([descriptor], dst_table)
    receiver.expect(ticket)
    try:
        _stream(sender, ticket, src_table)
        [(_, state, handoffs, error)] = poll_until_done(receiver, 20.0)
    finally:
        rx.close()
    assert state is TicketState.COMPLETE, error
    assert handoffs[ticket.seqs[0].seq_id].first_token_id == 7
    _check(decode_cache, prefill_cache, src_table, dst_table)
    # one gather/scatter per chunk message, of all its blocks and layers
    assert scatters == [NUM_PROMPT_BLOCKS // 2] * sender.metrics.chunks_sent
    if device == "cpu":  # one chunk of every layer per step (on GPU, layers already written
        assert sender.metrics.chunks_sent == 2  # travel together, the others one by one)
    assert (
        receiver.metrics.bytes_received
        == sender.metrics.bytes_sent
        == prefill_cache[:, :, :NUM_PROMPT_BLOCKS].nbytes
    )


@pytest.mark.parametrize(("src_size", "dst_size"), [(1, 2), (2, 1)])
def test_local_resharding_with_fragmented_tables(src_size, dst_size):
    """4 KV heads: prefill ranks hold heads [a, b), decode ranks [c, d); each chunk carries the
    heads [lo, hi) the two share, taken from and put at different offsets of the two caches."""
    total = 4
    src_table, dst_table = _tables("every_other")

    def layout(rank, size):
        return KVLayout(num_layers=LAYERS, num_blocks=BLOCKS, block_size=BLOCK_SIZE,
                        num_kv_heads=total // size, head_dim=HEAD_DIM, dtype="bfloat16",
                        total_kv_heads=total, tp_rank=rank, tp_size=size)  # fmt: skip

    full = _cache(total, seed=2)  # the model's KV, all heads
    receivers, caches, transports, descriptors = [], [], [], []
    for rank in range(dst_size):
        dst_layout = layout(rank, dst_size)
        cache = _cache(dst_layout.num_kv_heads)
        receivers.append(KVReceiver(cache, layout=dst_layout))
        transports.append(LocalTransport())
        descriptors.append(transports[-1].listen(f"decode-tp-{next(_ids)}", cache,
                                                 receivers[-1].on_message, dst_layout))  # fmt: skip
        caches.append(cache)
    ticket = _ticket(descriptors, dst_table)
    for receiver in receivers:
        receiver.expect(ticket)
    try:
        for rank in range(src_size):
            src_layout = layout(rank, src_size)
            heads = slice(*src_layout.kv_heads)
            sender = KVSender(LocalTransport(), full[:, :, :, :, heads].clone(), layout=src_layout)
            _stream(sender, ticket, src_table)
        for rank, (receiver, cache) in enumerate(zip(receivers, caches, strict=True)):
            [(_, state, _, error)] = poll_until_done(receiver, 20.0)
            assert state is TicketState.COMPLETE, error
            _check(cache, full, src_table, dst_table, slice(*layout(rank, dst_size).kv_heads))
    finally:
        for transport in transports:
            transport.close()


def test_receiver_refuses_unreserved_blocks_untouched():
    """A fragmented chunk with one block outside the ticket fails the ticket; nothing lands."""
    cache = _cache(2)
    receiver = KVReceiver(cache)
    ticket = _ticket([], [1, 3, 5])
    receiver.expect(ticket)
    chunk = LayerChunk(request_id=ticket.request_id, generation=1, seq_id=ticket.seqs[0].seq_id,
                       layer=0, runs=[(0, 1, 1), (1, 3, 1), (2, 4, 1)])  # fmt: skip
    receiver.on_message(chunk, cache_payload(_cache(2, seed=3), chunk))
    [(_, state, _, error)] = receiver.poll()
    assert state is TicketState.FAILED and "not reserved" in error
    assert not cache.any()


def test_block_pairs_expand_runs_in_order():
    pairs = block_pairs([(4, 9, 2), (0, 1, 1), (7, 3, 3)], max_blocks=10)
    assert pairs.tolist() == [[4, 5, 0, 7, 8, 9], [9, 10, 1, 3, 4, 5]]
    assert block_pairs([], max_blocks=10).shape == (2, 0)
    for bad in ([(0, 0, 0)], [(0, 0, 11)]):
        with pytest.raises(ValueError, match="empty or cover more"):
            block_pairs(bad, max_blocks=10)


def test_cuda_ipc_hands_over_the_mapped_cache_with_header_blocks():
    """cuda_ipc's receiver side turns a header into the mapped cache + its source block ids (no
    GPU needed for that part); a chunk outside the sender's cache becomes an abort."""
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport

    sender_cache = _cache(2, seed=4)
    got = []
    transport = CudaIpcTransport()
    transport._on_message = lambda message, payload: got.append((message, payload))
    chunk = LayerChunk(request_id="r", generation=1, seq_id="s", layer=1, num_layers=2,
                       runs=[(9, 2, 2), (3, 0, 1)])  # fmt: skip
    transport._deliver(chunk, sender_cache, KVLayout.of(sender_cache))
    transport._deliver(chunk.model_copy(update={"runs": [(39, 0, 2)]}), sender_cache,
                       KVLayout.of(sender_cache))  # fmt: skip
    (message, payload), (abort, none) = got
    assert message == chunk and payload.kv is sender_cache
    assert payload.blocks.tolist() == [9, 10, 3] and (payload.layer, payload.num_layers) == (1, 2)
    assert isinstance(abort, TransferAbort) and "outside" in abort.reason and none is None


@pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None,
    reason="ucxx is not installed (pip install 'pdray[ucx]' or 'pdray[ucx-cu13]')",
)
def test_ucx_fragmented_decode_table(scatters):
    """The same over UCX (TCP on loopback): one packed buffer per chunk, one scatter each."""
    from pdray.kv_transfer.ucx import UcxTransport  # ucxx is installed: an ImportError fails

    src_table, dst_table = _tables("every_other")
    prefill_cache, decode_cache = _cache(2, seed=5), _cache(2)
    receiver = KVReceiver(decode_cache)
    rx, tx = UcxTransport(host="127.0.0.1"), UcxTransport(host="127.0.0.1")
    try:
        descriptor = rx.listen(f"decode-ucx-{next(_ids)}", decode_cache, receiver.on_message)
        tx.register(prefill_cache)
        sender = KVSender(tx, prefill_cache)
        ticket = _ticket([descriptor], dst_table)
        receiver.expect(ticket)
        _stream(sender, ticket, src_table)
        [(_, state, _, error)] = poll_until_done(receiver, 20.0)
    finally:
        tx.close()
        rx.close()
    assert state is TicketState.COMPLETE, error
    _check(decode_cache, prefill_cache, src_table, dst_table)
    assert scatters == [NUM_PROMPT_BLOCKS // 2] * 2  # on CPU one chunk of every layer a step
    assert receiver.metrics.bytes_received == sender.metrics.bytes_sent


def test_a_stuck_sender_thread_fails_the_hand_off_in_time(monkeypatch):
    """The hand-off waits for the sender thread to hand over every queued chunk, but not forever:
    a thread that does not (here: its send blocks) fails it with a TransferError in time."""
    from pdray.kv_transfer.base import TransferError

    src_table, dst_table = _tables("contiguous")
    prefill_cache, decode_cache = _cache(2, seed=3), _cache(2)
    receiver = KVReceiver(decode_cache)
    rx, tx = LocalTransport(), LocalTransport()
    descriptor = rx.listen(f"decode-stuck-{next(_ids)}", decode_cache, receiver.on_message)
    sender = KVSender(tx, prefill_cache)
    ticket = _ticket([descriptor], dst_table)
    receiver.expect(ticket)
    release = threading.Event()
    monkeypatch.setattr(sender, "_send_layers", lambda *args: release.wait(30))
    try:
        seq = ticket.seqs[0]
        sender.add_ticket(ticket)
        runs = merge_runs(src_table[:4], seq.block_table[:4])
        sender.set_plan([(seq.seq_id, [(r.src, r.dst, r.num_blocks) for r in runs], 4)])
        sender.on_layer(0, LAYERS)
        sender.end_step()
        start = time.monotonic()
        with pytest.raises(TransferError, match="did not send its queued chunks within 0.3 s"):
            sender.hand_off([(seq.seq_id, SampledToken(7), None)], timeout_s=0.3)
        assert time.monotonic() - start < 5
    finally:
        release.set()
        rx.close()
