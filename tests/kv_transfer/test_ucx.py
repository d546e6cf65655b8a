"""UCX transport on CPU: loopback in one process, two processes, two network namespaces."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

# Skip only where the third-party ucxx is not installed; an ImportError of pdray's own module, or
# of an installed but broken ucxx, fails the collection of this file.
if importlib.util.find_spec("ucxx") is None:
    pytest.skip(
        "ucxx is not installed (pip install 'pdray[ucx]' or 'pdray[ucx-cu13]')",
        allow_module_level=True,
    )

from pdray.kv_transfer.ucx import UcxTransport  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import netns_helper as h  # noqa: E402
from disagg_harness import poll_until_done  # noqa: E402

from pdray.kv_transfer.base import (  # noqa: E402
    Handoff,
    KVDescriptor,
    KVLayout,
    LayerChunk,
    TransferAbort,
    TransferError,
    TransportKind,
)
from pdray.kv_transfer.payload import cache_payload  # noqa: E402
from pdray.kv_transfer.receiver import KVReceiver, TicketState  # noqa: E402

HELPER = Path(__file__).with_name("netns_helper.py")
REPO = Path(__file__).parents[2]


@pytest.fixture
def pair():
    """A receiver and a sender transport over loopback, closed afterwards."""
    rx, tx = UcxTransport(host="127.0.0.1"), UcxTransport(host="127.0.0.1")
    yield rx, tx
    tx.close()
    rx.close()


def _chunk(layer: int, runs: list[tuple[int, int, int]], num_layers: int = 1) -> LayerChunk:
    return LayerChunk(
        request_id=h.REQUEST_ID, generation=h.GENERATION, seq_id=h.SEQ_ID, layer=layer,
        num_layers=num_layers, runs=runs,
    )  # fmt: skip


def test_chunks_land_in_reserved_blocks_and_handoff_round_trips(pair):
    rx, tx = pair
    cache = torch.zeros(h.SHAPE, dtype=h.DTYPE)
    receiver = KVReceiver(cache)
    descriptor = rx.listen("decode-0", cache, receiver.on_message)
    assert descriptor.transport is TransportKind.UCX
    assert descriptor.address.startswith("127.0.0.1:")
    assert descriptor.layout == KVLayout.of(cache)
    receiver.expect(h.make_ticket(descriptor))

    h.send_ticket(descriptor, {"host": "127.0.0.1"})
    [(ticket, state, handoffs, error)] = poll_until_done(receiver)
    assert state is TicketState.COMPLETE, error
    assert h.check_received(cache, handoffs[h.SEQ_ID]) == []
    assert receiver.num_live == 0
    tx.connect(descriptor)  # a second sender of the same process reaches it too


def _packed(source: torch.Tensor, chunk: LayerChunk) -> torch.Tensor:
    """What a chunk's packed buffer must hold: its runs' blocks in order, its layers."""
    layers = slice(chunk.layer, chunk.layer + chunk.num_layers)
    return torch.cat([source[layers, :, src : src + n] for src, _, n in chunk.runs], dim=2)


def test_order_and_headers_survive(pair):
    rx, tx = pair
    cache = torch.zeros(2, 2, 8, 4, 2, 8)
    got: list = []

    def on_message(message, payload):
        assert payload is None or (payload.layer, payload.heads) == (0, (0, 2))
        assert payload is None or torch.equal(payload.blocks, torch.arange(payload.num_blocks))
        got.append((message, None if payload is None else payload.kv.clone()))

    descriptor = rx.listen("decode-1", cache, on_message)
    source = torch.randn(2, 2, 8, 4, 2, 8)
    tx.register(source)
    tx.connect(descriptor)
    tx.connect(descriptor)  # idempotent
    sent = []
    for i in range(60):
        if i % 3 == 2:
            message = Handoff(
                request_id=f"r{i}", generation=i, seq_id="s", num_chunks=i, first_token_id=i,
                logprob=float("-inf"), top_logprobs=[(1, -0.25), (2, -1.5)],
                sampler_state=os.urandom(100_000 if i == 5 else 64),  # i == 5: header > frame
            )  # fmt: skip
            tx.send("decode-1", message)
            sent.append((message, None))
        else:  # fragmented: two runs, the first descending from chunk to chunk
            message = _chunk(i % 2, [(i % 8, 7 - i % 8, 1), (0, 0, 2)], num_layers=2 - i % 2)
            tx.send("decode-1", message, cache_payload(source, message))
            sent.append((message, _packed(source, message)))
    tx.send("decode-1", TransferAbort(request_id="r", generation=0, reason="é ✓"))
    tx.flush("decode-1", timeout_s=10)
    assert len(got) == len(sent) + 1  # flush returns once all reached on_message
    for (message, packed), (received, received_packed) in zip(sent, got, strict=False):
        assert received == message
        assert (packed is None) == (received_packed is None)
        assert packed is None or torch.equal(packed, received_packed)  # one buffer per chunk
    assert got[-1][0].reason == "é ✓"


def test_sender_validates_payload_and_peers(pair):
    rx, tx = pair
    cache = torch.zeros(2, 2, 8, 4, 2, 8)
    descriptor = rx.listen("decode-2", cache, lambda m, p: None)
    one_block = _chunk(0, [(0, 0, 1)])
    with pytest.raises(TransferError, match="connect"):
        tx.send("decode-2", one_block, cache_payload(cache, one_block))
    tx.register(torch.zeros(2, 2, 8, 4, 2, 16))
    with pytest.raises(TransferError, match="layouts differ"):
        tx.connect(descriptor)
    tx.register(cache)
    tx.connect(descriptor)
    with pytest.raises(ValueError, match="KVPayload"):
        tx.send("decode-2", one_block, [cache[:1, :, :1]])
    with pytest.raises(ValueError, match="blocks, layers, heads"):  # payload of another chunk
        tx.send("decode-2", one_block, cache_payload(cache, _chunk(0, [(0, 0, 2)])))
    with pytest.raises(ValueError, match="blocks, layers, heads"):
        tx.send("decode-2", _chunk(0, [(0, 0, 1)], num_layers=2), cache_payload(cache, one_block))
    with pytest.raises(ValueError, match="do not fit"):
        other = torch.zeros(2, 2, 8, 4, 2, 8, dtype=torch.float16)
        tx.send("decode-2", one_block, cache_payload(other, one_block))
    with pytest.raises(ValueError, match="carries no payload"):
        tx.send("decode-2", TransferAbort(request_id="r", generation=0, reason="x"),
                cache_payload(cache, one_block))  # fmt: skip
    with pytest.raises(ValueError, match="already set up"):
        UcxTransport(ucx_options={"TLS": "definitely-not-the-current-setting"})


def test_unreachable_peer_raises():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    layout = KVLayout.of(torch.zeros(1, 2, 1, 1, 1, 1))
    peer = KVDescriptor(
        engine_id="gone", transport=TransportKind.UCX, layout=layout, address=f"127.0.0.1:{port}"
    )
    tx = UcxTransport(connect_timeout_s=1)
    try:
        start = time.monotonic()
        with pytest.raises(TransferError, match="gone"):
            tx.connect(peer)
        assert time.monotonic() - start < 8
    finally:
        tx.close()


def test_flush_times_out_then_lost_peer_fails(pair):
    rx, tx = pair
    cache = torch.zeros(2, 2, 8, 4, 2, 8)
    release = threading.Event()
    descriptor = rx.listen("decode-3", cache, lambda m, p: release.wait(10))
    tx.connect(descriptor)
    tx.send("decode-3", TransferAbort(request_id="r", generation=0, reason="x"))
    with pytest.raises(TransferError, match="timed out"):
        tx.flush("decode-3", timeout_s=0.3)
    release.set()
    tx.flush("decode-3", timeout_s=10)

    rx.close()
    with pytest.raises(TransferError, match="decode-3"):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the loss shows on send or flush, whichever is first
            tx.send("decode-3", TransferAbort(request_id="r", generation=0, reason="x"))
            tx.flush("decode-3", timeout_s=5)
            time.sleep(0.05)


def _send_in_child(descriptor: KVDescriptor) -> None:
    h.send_ticket(descriptor, {"host": "127.0.0.1"})


def test_two_processes(pair):
    rx, _ = pair
    cache = torch.zeros(h.SHAPE, dtype=h.DTYPE)
    receiver = KVReceiver(cache)
    descriptor = rx.listen("decode-4", cache, receiver.on_message)
    receiver.expect(h.make_ticket(descriptor))
    child = mp.get_context("spawn").Process(target=_send_in_child, args=(descriptor,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    [(_, state, handoffs, error)] = poll_until_done(receiver)
    assert state is TicketState.COMPLETE, error
    assert h.check_received(cache, handoffs[h.SEQ_ID]) == []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair: ((ns, device, address), (ns, device, address))."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        reason = "network namespaces need Linux, root and iproute2"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
    ends = [(f"pdray-{tag}-{i}", f"pdv{tag}{i}", f"{subnet}.{i + 1}") for i in range(2)]
    created = []
    try:
        for ns, _, _ in ends:
            _ip("netns", "add", ns)
            created.append(ns)
        (ns_a, dev_a, _), (ns_b, dev_b, _) = ends
        _ip(*f"link add {dev_a} netns {ns_a} type veth peer name {dev_b} netns {ns_b}".split())
        for ns, dev, address in ends:
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        detail = e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) else e
        print(f"skipping: cannot create network namespaces: {detail}")
        pytest.skip(f"cannot create network namespaces: {detail}")
    try:
        yield ends
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, then the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_across_network_namespaces(two_namespaces):
    (ns_a, dev_a, addr_a), (ns_b, dev_b, _) = two_namespaces
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    python = [sys.executable, str(HELPER)]
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", ns_a, *python, "receive", "--host", addr_a, "--device", dev_a],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        descriptor = receiver.stdout.readline()
        assert descriptor, receiver.stderr.read()
        assert json.loads(descriptor)["address"].startswith(f"{addr_a}:")
        sender = subprocess.run(
            ["ip", "netns", "exec", ns_b, *python, "send", "--descriptor", descriptor, "--device", dev_b],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert sender.returncode == 0, sender.stderr
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], (result, err)
    print(f"netns transfer: {result}, payload {h.payload_bytes()} bytes")
    assert result["rx_bytes"] >= h.payload_bytes()  # the KV crossed the veth pair
