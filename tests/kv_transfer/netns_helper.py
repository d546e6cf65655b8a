"""Both ends of a UCX KV transfer for one ticket, for tests that run them in other processes.

`python netns_helper.py receive --host H [--device D]` prints the receiver's descriptor as one JSON
line, waits for the ticket, checks every block and prints a JSON result line.
`python netns_helper.py send --descriptor JSON [--device D]` pushes the ticket's chunks and handoff.
Both sides derive the source KV from SEED, so the receiver can check the bytes it got.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pdray.kv_transfer.base import (
    Handoff,
    KVDescriptor,
    LayerChunk,
    SeqTicket,
    Ticket,
    merge_runs,
)
from pdray.kv_transfer.payload import cache_payload
from pdray.kv_transfer.receiver import KVReceiver, TicketState
from pdray.kv_transfer.ucx import UcxTransport

SHAPE = (3, 2, 48, 16, 2, 32)  # [layers, K/V, blocks, block_size, kv_heads, head_dim]
DTYPE = torch.bfloat16
SEED = 1234
SRC_BLOCKS = [3, 4, 5, 6, 10, 20, 21, 40, 41, 42, 43, 44]
DST_BLOCKS = [0, 1, 2, 3, 7, 9, 10, 30, 31, 32, 33, 34]
SAMPLER_STATE = bytes(range(256)) * 4
REQUEST_ID, GENERATION, SEQ_ID = "req-0", 7, "seq-0"


def source_cache() -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(SHAPE, generator=generator).to(DTYPE)


def payload_bytes() -> int:
    source = source_cache()
    return len(SRC_BLOCKS) * source[:, :, 0].nbytes


def make_ticket(descriptor: KVDescriptor) -> Ticket:
    seq = SeqTicket(seq_id=SEQ_ID, block_table=DST_BLOCKS, num_cached_tokens=0)
    return Ticket(
        request_id=REQUEST_ID, generation=GENERATION, seqs=[seq],
        deadline_s=time.time() + 60, receivers=[descriptor],
    )  # fmt: skip


def send_ticket(descriptor: KVDescriptor, options: dict) -> None:
    """Sender side: connect, one LayerChunk per layer, Handoff, flush."""
    source = source_cache()
    transport = UcxTransport(**options)
    try:
        transport.register(source)
        transport.connect(descriptor)
        runs = merge_runs(SRC_BLOCKS, DST_BLOCKS)
        triples = [(r.src, r.dst, r.num_blocks) for r in runs]
        for layer, num_layers in [(0, 1), (1, SHAPE[0] - 1)]:  # one layer, then the rest at once
            chunk = LayerChunk(
                request_id=REQUEST_ID, generation=GENERATION, seq_id=SEQ_ID, layer=layer,
                num_layers=num_layers, runs=triples,
            )  # fmt: skip
            transport.send(descriptor.engine_id, chunk, cache_payload(source, chunk))
        handoff = Handoff(
            request_id=REQUEST_ID, generation=GENERATION, seq_id=SEQ_ID, num_chunks=SHAPE[0],
            first_token_id=42, logprob=-0.5, sampler_state=SAMPLER_STATE,
        )  # fmt: skip
        transport.send(descriptor.engine_id, handoff)
        transport.flush(descriptor.engine_id, timeout_s=20)
    finally:
        transport.close()


def check_received(cache: torch.Tensor, handoff: Handoff) -> list[str]:
    """Problems with what arrived (empty when every byte is where it belongs)."""
    source = source_cache()
    problems = []
    for src, dst in zip(SRC_BLOCKS, DST_BLOCKS, strict=True):
        if not torch.equal(cache[:, :, dst], source[:, :, src]):
            problems.append(f"block {dst} differs from source block {src}")
    untouched = [b for b in range(SHAPE[2]) if b not in DST_BLOCKS]
    if cache[:, :, untouched].abs().sum().item() != 0:
        problems.append("blocks outside the ticket were written")
    if handoff.sampler_state != SAMPLER_STATE or handoff.first_token_id != 42:
        problems.append(f"handoff did not round-trip: {handoff}")
    return problems


def receive(options: dict, timeout_s: float, announce=print) -> dict:
    """Receiver side: listen, announce the descriptor, wait for the ticket, check it."""
    cache = torch.zeros(SHAPE, dtype=DTYPE)
    receiver = KVReceiver(cache)
    transport = UcxTransport(**options)
    try:
        descriptor = transport.listen("decode-ns", cache, receiver.on_message)
        receiver.expect(make_ticket(descriptor))
        announce(descriptor.model_dump_json())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, state, handoffs, error in receiver.poll():
                if state is not TicketState.COMPLETE:
                    return {"ok": False, "problems": [f"ticket {state.value}: {error}"]}
                problems = check_received(cache, handoffs[SEQ_ID])
                return {"ok": not problems, "problems": problems}
            time.sleep(0.01)
        return {"ok": False, "problems": [f"nothing arrived in {timeout_s} s"]}
    finally:
        transport.close()


def _rx_bytes(device: str) -> int:
    return int(Path(f"/sys/class/net/{device}/statistics/rx_bytes").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["receive", "send"])
    parser.add_argument("--host")
    parser.add_argument("--device")
    parser.add_argument("--descriptor")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    options: dict = {"ucx_options": {"TLS": "tcp"}}
    if args.device:
        options["net_devices"] = [args.device]
    if args.role == "send":
        send_ticket(KVDescriptor.model_validate_json(args.descriptor), options)
        print(json.dumps({"ok": True}), flush=True)
        return
    options["host"] = args.host
    rx_before = _rx_bytes(args.device) if args.device else 0
    result = receive(options, args.timeout_s, announce=lambda line: print(line, flush=True))
    if args.device:
        result["rx_bytes"] = _rx_bytes(args.device) - rx_before
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
