"""`ucx` transport: KV over UCX (ucxx) between processes and nodes; host buffers over TCP on CPU.

Every UcxTransport of a process shares one UCX context and one event-loop thread ("pdray-ucx",
`ucx_runtime`), where all ucxx calls run; engine threads only post work to it. UCX options
(NET_DEVICES, ...) are fixed by the first transport of the process.

  receiver  listen() -> UCX listener on `port` (all interfaces; `host` is the address advertised)
            per incoming endpoint, in order: frame -> header -> [LayerChunk: the chunk's packed
            K and V into one fresh buffer on the cache's device] -> on_message(message,
            packed_payload(buffer)) on the loop thread, which scatters it into the cache;
            a flush marker is answered with an ack once every earlier message was delivered
  sender    connect(peer) -> endpoint (idempotent; reconnects after a failure)
            send() -> a LayerChunk's blocks packed into one staging buffer [num_layers, 2, n,
            block_size, heads, head_dim] by one gather (`kernels.kv_copy`); header and buffer
            posted on the loop thread in call order (never blocks on the network)
            flush() -> marker + wait for its ack: every earlier message reached on_message
            a failed send or a lost connection fails the peer: later send/flush raise TransferError
  close()   listener and endpoints closed; the process's UCX context stays for later transports

Wire format per message, on the endpoint's tag stream (UCX matches it in post order): a frame
[u64 header length][header JSON, when it fits in the frame] (else the header follows alone), then for
a LayerChunk of n > 0 blocks one message: the packed buffer, blocks in `block_pairs` order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from pdray.kv_transfer.base import (
    KVDescriptor,
    KVLayout,
    KVPayload,
    KVTransport,
    LayerChunk,
    Message,
    OnMessage,
    TransferAbort,
    TransferError,
    TransportKind,
)
from pdray.kv_transfer.payload import pack_payload, packed_payload
from pdray.kv_transfer.ucx_runtime import default_host, get_runtime, is_exiting, ucxx
from pdray.kv_transfer.wire import from_wire, to_wire

logger = logging.getLogger(__name__)

_FRAME_BYTES = 1 << 16
_LEN = struct.Struct("<Q")
_FLUSH = "flush"


def _encode(message: Message) -> bytes:
    return json.dumps(to_wire(message)).encode()


def _frames(body: bytes) -> list[bytes]:
    head = _LEN.pack(len(body))
    return [head + body] if len(head) + len(body) <= _FRAME_BYTES else [head, body]


def _wire(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    """The tensor's bytes as a flat uint8 buffer ucxx can read or fill (no copy)."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


def _pack(layout: KVLayout, chunk: LayerChunk, payload: KVPayload | None) -> torch.Tensor:
    """The chunk's K and V in one staging buffer, checked against the receiver's `layout`."""
    if not isinstance(payload, KVPayload):
        raise ValueError(f"a LayerChunk needs a KVPayload, got {type(payload).__name__}")
    heads = layout.num_kv_heads if chunk.kv_heads is None else chunk.kv_heads[1] - chunk.kv_heads[0]
    have = (payload.num_blocks, payload.num_layers, payload.heads[1] - payload.heads[0])
    need = (sum(n for _, _, n in chunk.runs), chunk.num_layers, heads)
    if have != need:
        raise ValueError(f"the payload holds {have} (blocks, layers, heads); the chunk {need}")
    kv = payload.kv
    fits = kv.dtype == getattr(torch, layout.dtype)
    if not fits or (kv.shape[3], kv.shape[5]) != (layout.block_size, layout.head_dim):
        raise ValueError(f"payload blocks of {tuple(kv.shape)} {kv.dtype} do not fit the "
                         f"receiver's layout {layout}")  # fmt: skip
    return pack_payload(payload)


@dataclass(eq=False)
class _Peer:
    descriptor: KVDescriptor
    endpoint: object
    tasks: set[asyncio.Task] = field(default_factory=set)
    error: str | None = None
    flush_seq: int = 0
    waiters: list[tuple[int, asyncio.Future]] = field(default_factory=list)


class UcxTransport(KVTransport):
    kind = TransportKind.UCX

    def __init__(
        self,
        host: str | None = None,
        net_devices: list[str] | None = None,
        port: int = 0,
        ucx_options: dict[str, str] | None = None,
        connect_timeout_s: float = 10.0,
    ):
        """host: address peers reach this receiver at (default: first network interface's).
        net_devices: UCX_NET_DEVICES, e.g. ["mlx5_0:1"] (FastDeploy's KVCACHE_RDMA_NICS).
        port: listening port, 0 = any free port. ucx_options: further UCX settings, e.g.
        {"TLS": "tcp"}, without the UCX_ prefix."""
        options = {k.removeprefix("UCX_"): str(v) for k, v in (ucx_options or {}).items()}
        if net_devices:
            options["NET_DEVICES"] = ",".join(net_devices)
        self._rt = get_runtime(options)
        self.host = host or default_host(net_devices)
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self._layout: KVLayout | None = None
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._listener = None
        self._kv_cache: torch.Tensor | None = None
        self._on_message: OnMessage | None = None
        self._serving: set = set()
        self._closing = False

    # -- receiver ----------------------------------------------------------------------------

    def listen(
        self,
        engine_id: str,
        kv_cache: torch.Tensor,
        on_message: OnMessage,
        layout: KVLayout | None = None,
    ) -> KVDescriptor:
        if self._listener is not None:
            raise ValueError("this UcxTransport is already listening")
        self._kv_cache, self._on_message = kv_cache, on_message
        layout = layout or KVLayout.of(kv_cache)

        async def start():
            return ucxx.create_listener(self._serve, port=self.port)

        try:
            self._listener = self._rt.run(start(), 30.0, "UCX listen")
        except ucxx.exceptions.UCXError as e:
            raise TransferError(f"cannot listen for KV on port {self.port}: {e}") from e
        return KVDescriptor(
            engine_id=engine_id, transport=self.kind, layout=layout,
            address=f"{self.host}:{self._listener.port}", host=socket.gethostname(),
        )  # fmt: skip

    async def _serve(self, ep) -> None:
        self._serving.add(ep)
        frame = np.empty(_FRAME_BYTES, np.uint8)
        tickets: set[tuple[str, int]] = set()  # (request_id, generation) this sender fed
        try:
            while True:
                await ep.recv(frame)
                (length,) = _LEN.unpack_from(frame)
                if _LEN.size + length <= _FRAME_BYTES:
                    raw = frame[_LEN.size : _LEN.size + length].tobytes()
                else:
                    raw = bytearray(length)
                    await ep.recv(raw)
                header = json.loads(raw)
                if header.get("type") == _FLUSH:
                    await ep.send(np.array([header["seq"]], np.uint64))
                    continue
                message = from_wire(header)
                key = (message.request_id, message.generation)
                if isinstance(message, LayerChunk):
                    tickets.add(key)
                else:  # a hand-off or an abort ends what this sender owes the ticket
                    tickets.discard(key)
                payload = await self._recv_payload(ep, message)
                try:
                    self._on_message(message, payload)
                except Exception:
                    logger.exception("KV on_message failed for %s", type(message).__name__)
        except ucxx.exceptions.UCXError as e:
            if not self._closing:
                logger.debug("UCX KV connection ended: %s", e)
        except Exception:
            logger.exception("dropping a UCX KV connection that sent a bad message")
        finally:
            self._serving.discard(ep)
            ep.abort(period=10**9)
            if not self._closing:  # the sender is gone: fail its tickets now, not at lease end
                for request_id, generation in tickets:
                    abort = TransferAbort(request_id=request_id, generation=generation,
                                          reason="KV sender connection lost")  # fmt: skip
                    self._on_message(abort, None)

    async def _recv_payload(self, ep, message: Message) -> KVPayload | None:
        if not isinstance(message, LayerChunk):
            return None
        cache = self._kv_cache
        sizes = [n for _, _, n in message.runs]
        if any(n <= 0 for n in sizes) or sum(sizes) > cache.shape[2]:
            raise ValueError(f"bad runs {message.runs} for a cache of {cache.shape[2]} blocks")
        if not 0 <= message.layer <= message.layer + message.num_layers <= cache.shape[0]:
            raise ValueError(f"layers {message.layer}+{message.num_layers} outside the KV cache")
        block_size, heads, head_dim = cache.shape[3:]
        if message.kv_heads is not None:
            heads = message.kv_heads[1] - message.kv_heads[0]
            if not 0 < heads <= cache.shape[4]:
                raise ValueError(f"bad KV heads {message.kv_heads} for a cache of {cache.shape[4]}")
        shape = (message.num_layers, 2, sum(sizes), block_size, heads, head_dim)
        buffer = torch.empty(shape, dtype=cache.dtype, device=cache.device)
        if buffer.numel():
            if cache.is_cuda:  # memory freed on the stream may still be read there
                torch.cuda.current_stream(cache.device).synchronize()
            self._rt.worker.populate_python_futures_pool()
            await ep.recv(_wire(buffer))
        return packed_payload(buffer)

    # -- sender ------------------------------------------------------------------------------

    def register(self, kv_cache: torch.Tensor, layout: KVLayout | None = None) -> None:
        self._layout = layout or KVLayout.of(kv_cache)

    def connect(self, peer: KVDescriptor) -> None:
        if peer.transport is not self.kind:
            raise TransferError(f"cannot reach a {peer.transport.value} receiver over ucx")
        if self._layout is not None and not peer.layout.compatible_with(self._layout):
            raise TransferError(
                f"KV layouts differ: {peer.engine_id} has {peer.layout}, we have {self._layout}"
            )
        with self._lock:
            current = self._peers.get(peer.engine_id)
            if current is not None and current.descriptor == peer:
                if current.error is None:
                    return
                # Lost: that receiver is gone (a replacement listens at a new address). Trying
                # again would hold every transfer of this process for the connect timeout.
                raise TransferError(
                    f"UCX KV receiver {peer.engine_id!r} at {peer.address} was lost: "
                    f"{current.error}"
                )
            host, _, port = peer.address.rpartition(":")
            timeout_s = self.connect_timeout_s
            what = f"connecting to UCX KV receiver {peer.engine_id!r} at {peer.address}"
            try:
                endpoint = self._rt.run(
                    ucxx.create_endpoint(host, int(port), connect_timeout=timeout_s),
                    timeout_s + 5,
                    what,
                )
            except (asyncio.TimeoutError, TimeoutError) as e:
                raise TransferError(f"{what}: no answer within {timeout_s:g} s") from e
            except (ValueError, OSError, ucxx.exceptions.UCXError) as e:
                raise TransferError(f"{what} failed: {type(e).__name__}: {e}") from e
            state = _Peer(peer, endpoint)
            self._peers[peer.engine_id] = state
        self._rt.loop.call_soon_threadsafe(self._start_peer, state, current)

    def _start_peer(self, peer: _Peer, replaced: _Peer | None) -> None:
        if replaced is not None:
            self._fail(replaced, "replaced by a new connection")
        peer.tasks.add(self._rt.loop.create_task(self._read_acks(peer)))

    async def _read_acks(self, peer: _Peer) -> None:
        ack = np.zeros(1, np.uint64)
        while True:
            try:
                await peer.endpoint.recv(ack)
            except Exception as e:
                self._fail(peer, f"connection lost: {type(e).__name__}: {e}")
                return
            done = [w for w in peer.waiters if w[0] <= int(ack[0])]
            peer.waiters = [w for w in peer.waiters if w[0] > int(ack[0])]
            for _, waiter in done:
                if not waiter.done():
                    waiter.set_result(None)

    def send(self, peer_id: str, message: Message, payload: KVPayload | None = None) -> None:
        peer = self._peer(peer_id)
        buffers = _frames(_encode(message))
        if isinstance(message, LayerChunk):
            packed = _pack(peer.descriptor.layout, message, payload)
            if packed.numel():
                buffers.append(_wire(packed))
        elif payload:
            raise ValueError(f"a {type(message).__name__} carries no payload")
        self._rt.loop.call_soon_threadsafe(self._post, peer, buffers)

    def _post(self, peer: _Peer, buffers: list) -> None:
        if peer.error is not None:
            return
        for buffer in buffers:
            task = self._rt.loop.create_task(self._send_one(peer.endpoint, buffer))
            peer.tasks.add(task)
            task.add_done_callback(partial(self._sent, peer))

    async def _send_one(self, endpoint, buffer) -> None:
        # each request takes a future from ucxx's pool, which the notifier refills only now and then
        self._rt.worker.populate_python_futures_pool()
        await endpoint.send(buffer)

    def _sent(self, peer: _Peer, task: asyncio.Task) -> None:
        peer.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(peer, f"send failed: {type(task.exception()).__name__}: {task.exception()}")

    def _fail(self, peer: _Peer, reason: str) -> None:
        if peer.error is not None:
            return
        peer.error = (
            f"UCX KV peer {peer.descriptor.engine_id!r} at {peer.descriptor.address}: {reason}"
        )
        if not (self._closing or is_exiting()):
            logger.warning("%s", peer.error)
        for _, waiter in peer.waiters:
            if not waiter.done():
                waiter.set_result(None)
        peer.waiters = []
        for task in list(peer.tasks):
            task.cancel()
        peer.endpoint.abort(period=10**9)

    def flush(self, peer_id: str, timeout_s: float) -> None:
        peer = self._peer(peer_id)
        future = asyncio.run_coroutine_threadsafe(self._flush(peer), self._rt.loop)
        try:
            future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise
            future.cancel()
            raise TransferError(
                f"flush to UCX KV peer {peer_id!r} at {peer.descriptor.address} timed out "
                f"after {timeout_s:g} s"
            ) from None
        if peer.error is not None:
            raise TransferError(peer.error)

    async def _flush(self, peer: _Peer) -> None:
        if peer.error is not None:
            return
        peer.flush_seq += 1
        waiter = self._rt.loop.create_future()
        peer.waiters.append((peer.flush_seq, waiter))
        self._post(peer, _frames(json.dumps({"type": _FLUSH, "seq": peer.flush_seq}).encode()))
        await waiter

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"not connected to KV receiver {peer_id!r}: call connect() first")
        if peer.error is not None:
            raise TransferError(peer.error)
        return peer

    # -- both --------------------------------------------------------------------------------

    def close(self) -> None:
        self._closing = True

        async def shutdown():
            for peer in self._peers.values():
                self._fail(peer, "transport closed")
            for ep in list(self._serving):
                ep.abort(period=10**9)
            if self._listener is not None:
                for _ in range(500):  # let the handlers of aborted connections return
                    if self._listener.active_clients == 0:
                        break
                    await asyncio.sleep(0.01)
                self._listener.close()
                self._listener = None

        self._rt.run(shutdown(), 30.0, "UCX close")
        self._peers.clear()
