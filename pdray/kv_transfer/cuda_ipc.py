"""`cuda_ipc` transport: KV stays in the sender's GPU memory; the receiver copies it through CUDA IPC.

Only headers travel, as length-prefixed JSON frames over one TCP connection per (sender,
receiver) pair on an OS-assigned port. The receiver maps the sender's whole KV-cache allocation
once (CuPy `ipcOpenMemHandle` on the allocation base, plus the cache's offset in it) and, for each
LayerChunk, hands `on_message` the mapped sender cache with the header's source block ids as the
payload (`cache_payload`), so the receiver's one gather/scatter into its own blocks, whatever the
fragmentation of either block table, is the only copy.

Connection lifecycle:

  receiver  listen()        server socket -> KVDescriptor(address="host:port", host=node)
  sender    register(cache) IPC handle of the cache's allocation base, offset, layout, GPU bus id
  sender    connect(peer)   hello(handle, offset, layout) -> receiver maps the cache -> ready | refused
  sender    send(message)   one frame, in order  -> receiver: payload views -> on_message
  sender    flush(peer)     flush(n) frame       -> receiver answers ack(n) once every earlier frame
                                                    was applied or dropped
  close / EOF on either side: the receiver unmaps the sender cache; pending flushes fail.

A sender may reuse blocks it sent only after a flush returned: until the ack, the receiver may
still be reading them. CuPy is imported lazily, only when a CUDA cache is registered or mapped.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable

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
    gpu_uuid,
)
from pdray.kv_transfer.payload import cache_payload
from pdray.kv_transfer.wire import from_wire, to_wire

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_exported: dict[str, torch.Tensor] = {}  # token -> registered cache, for a receiver in this process


def _write(sock: socket.socket, frame: dict) -> None:
    data = json.dumps(frame, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _read(rfile) -> dict | None:
    header = rfile.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = rfile.read(size)
    return json.loads(data) if len(data) == size else None


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# -- CUDA IPC (CuPy, lazily) -----------------------------------------------------------------------


def _allocation_range(ptr: int) -> tuple[int, int]:
    """Base and size of the cudaMalloc allocation holding `ptr` (a handle names the whole one)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2(
        ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
    )
    if status != 0:
        raise TransferError(f"cuMemGetAddressRange failed (CUDA driver error {status})")
    return base.value, size.value


def _export(kv_cache: torch.Tensor) -> dict:
    if not kv_cache.is_cuda or not kv_cache.is_contiguous():
        raise ValueError("cuda_ipc needs a contiguous KV cache on a CUDA device")
    import cupy

    device = kv_cache.device.index
    with cupy.cuda.Device(device):
        base, alloc_bytes = _allocation_range(kv_cache.data_ptr())
        try:
            handle = cupy.cuda.runtime.ipcGetMemHandle(base)
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise TransferError(
                f"cannot export the KV cache over CUDA IPC ({e}); it must be a plain cudaMalloc "
                "allocation (PyTorch's expandable_segments allocator is not supported)"
            ) from e
        bus_id = cupy.cuda.runtime.deviceGetPCIBusId(device)
    return {
        "handle": base64.b64encode(handle).decode(),
        "alloc_bytes": alloc_bytes,
        "offset": kv_cache.data_ptr() - base,
        "pci_bus_id": bus_id,
    }


def _enable_peer_access(cupy, device: int, pci_bus_id: str) -> None:
    try:
        peer = cupy.cuda.runtime.deviceGetByPCIBusId(pci_bus_id)
    except cupy.cuda.runtime.CUDARuntimeError:
        return  # the sender's GPU is not visible here; the lazy peer-access flag still applies
    if peer != device and cupy.cuda.runtime.deviceCanAccessPeer(device, peer):
        with contextlib.suppress(cupy.cuda.runtime.CUDARuntimeError):  # already enabled
            cupy.cuda.runtime.deviceEnablePeerAccess(peer)


def _map_peer_cache(hello: dict, device: torch.device) -> tuple[torch.Tensor, Callable[[], None]]:
    """The sender's cache as a tensor of its layout, and the function that unmaps it."""
    layout = KVLayout(**hello["layout"])
    if hello["pid"] == os.getpid():
        cache = _exported.get(hello["token"])
        if cache is None:
            raise TransferError("the sender's KV cache is no longer registered")
        return cache, lambda: None
    import cupy

    dtype = getattr(torch, layout.dtype)
    shape = (layout.num_layers, 2, layout.num_blocks, layout.block_size, layout.num_kv_heads,
             layout.head_dim)  # fmt: skip
    num_bytes = dtype.itemsize * int(torch.Size(shape).numel())
    if hello["offset"] + num_bytes > hello["alloc_bytes"]:
        raise TransferError("the sender's KV cache does not fit its announced allocation")
    with cupy.cuda.Device(device.index):
        _enable_peer_access(cupy, device.index, hello["pci_bus_id"])
        ptr = cupy.cuda.runtime.ipcOpenMemHandle(base64.b64decode(hello["handle"]))
        # on this GPU: copies run here and read the sender's GPU through peer access
        memory = cupy.cuda.UnownedMemory(ptr, hello["alloc_bytes"], None, device.index)
        flat = cupy.ndarray(
            (num_bytes,), cupy.uint8, cupy.cuda.MemoryPointer(memory, hello["offset"])
        )
        cache = torch.as_tensor(flat).view(dtype).view(shape)

    def unmap() -> None:
        with cupy.cuda.Device(device.index):
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)

    return cache, unmap


# -- sender side -----------------------------------------------------------------------------------


class _Link:
    """One connection to a receiver: ordered writes, and acks read by a thread."""

    def __init__(self, sock: socket.socket, rfile, address: str):
        self.sock, self.rfile, self.address = sock, rfile, address
        self.write_lock = threading.Lock()
        self.acked = threading.Condition()
        self.num_flushes = 0
        self.num_acked = 0
        self.error: str | None = None
        threading.Thread(target=self._read_acks, daemon=True, name="kv-ipc-acks").start()

    def write(self, frame: dict, timeout_s: float = -1) -> None:
        if not self.write_lock.acquire(timeout=timeout_s):
            raise TransferError(f"cuda_ipc: receiver {self.address} stopped reading")
        try:
            if self.error is not None:
                raise TransferError(f"cuda_ipc: connection to {self.address} lost: {self.error}")
            try:
                _write(self.sock, frame)
            except OSError as e:
                self._fail(f"{type(e).__name__}: {e}")
                raise TransferError(f"cuda_ipc: sending to {self.address} failed: {e}") from e
        finally:
            self.write_lock.release()

    def flush(self, timeout_s: float) -> None:
        with self.acked:
            self.num_flushes += 1
            n = self.num_flushes
        self.write({"t": "flush", "n": n}, timeout_s)
        with self.acked:
            self.acked.wait_for(lambda: self.num_acked >= n or self.error is not None, timeout_s)
            if self.num_acked >= n:
                return
            why = self.error or f"no acknowledgement within {timeout_s} s"
        raise TransferError(f"cuda_ipc: flush to {self.address} failed: {why}")

    def _read_acks(self) -> None:
        try:
            while (frame := _read(self.rfile)) is not None:
                if frame.get("t") == "ack":
                    with self.acked:
                        self.num_acked = max(self.num_acked, frame["n"])
                        self.acked.notify_all()
        except (OSError, ValueError) as e:
            self._fail(f"{type(e).__name__}: {e}")
        self._fail("the receiver closed the connection")

    def _fail(self, why: str) -> None:
        with self.acked:
            self.error = self.error or why
            self.acked.notify_all()

    def close(self) -> None:
        self._fail("closed by the sender")
        _shutdown(self.sock)
        self.sock.close()


class CudaIpcTransport(KVTransport):
    """`host`: address the receiver listens on (127.0.0.1: engines of one node reach it)."""

    kind = TransportKind.CUDA_IPC

    def __init__(self, host: str = "127.0.0.1", connect_timeout_s: float = 10.0):
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}
        self._hello: dict | None = None
        self._server: socket.socket | None = None
        self._inbound: dict[socket.socket, tuple[threading.Thread, torch.Tensor | None]] = {}
        self._closed = False

    # -- receiver side ---------------------------------------------------------------------------

    def listen(
        self,
        engine_id: str,
        kv_cache: torch.Tensor,
        on_message: OnMessage,
        layout: KVLayout | None = None,
    ) -> KVDescriptor:
        if self._server is not None:
            raise ValueError("this cuda_ipc transport already listens")
        self._server = socket.create_server((self.host, 0))
        self._layout = layout or KVLayout.of(kv_cache)
        self._device = kv_cache.device
        self._on_message = on_message
        threading.Thread(target=self._accept, daemon=True, name="kv-ipc-accept").start()
        port = self._server.getsockname()[1]
        return KVDescriptor(
            engine_id=engine_id,
            transport=self.kind,
            layout=self._layout,
            address=f"{self.host}:{port}",
            host=socket.gethostname(),
            extra={"pid": os.getpid(), "gpu": gpu_uuid(kv_cache)},
        )

    def mapped_caches(self) -> list[torch.Tensor]:
        """The sender caches this receiver has mapped (one per live connection)."""
        with self._lock:
            return [cache for _, cache in self._inbound.values() if cache is not None]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                      name="kv-ipc-recv")  # fmt: skip
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._inbound[sock] = (thread, None)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        unmap = None
        try:
            hello = _read(rfile)
            if hello is None or hello.get("t") != "hello":
                return
            try:
                layout = KVLayout(**hello["layout"])
                if not layout.compatible_with(self._layout):
                    raise TransferError("the sender's KV layout differs from this receiver's")
                cache, unmap = _map_peer_cache(hello, self._device)
            except Exception as e:
                _write(sock, {"t": "refused", "reason": f"{type(e).__name__}: {e}"})
                return
            with self._lock:
                self._inbound[sock] = (self._inbound[sock][0], cache)
            _write(sock, {"t": "ready"})
            while (frame := _read(rfile)) is not None:
                if frame["t"] == "flush":
                    _write(sock, {"t": "ack", "n": frame["n"]})
                else:
                    self._deliver(from_wire(frame), cache, layout)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("cuda_ipc: connection from a sender broke: %s", e)
        finally:
            with self._lock:
                self._inbound.pop(sock, None)
            rfile.close()
            sock.close()
            cache = None
            if unmap is not None:
                unmap()

    def _deliver(self, message: Message, cache: torch.Tensor, layout: KVLayout) -> None:
        payload = None
        if isinstance(message, LayerChunk):
            try:
                payload = cache_payload(cache, message, layout)
            except ValueError as e:  # layers, blocks or heads the sender's cache does not hold
                message = TransferAbort(
                    request_id=message.request_id, generation=message.generation,
                    reason=f"cuda_ipc: {e} (the sender's)",
                )  # fmt: skip
        try:
            self._on_message(message, payload)
        except Exception:  # the receiver fences its own failures; keep the connection
            logger.exception("cuda_ipc: on_message failed")

    # -- sender side -----------------------------------------------------------------------------

    def register(self, kv_cache: torch.Tensor, layout: KVLayout | None = None) -> None:
        exported = _export(kv_cache)
        token = uuid.uuid4().hex
        _exported[token] = kv_cache
        layout = layout or KVLayout.of(kv_cache)
        self._hello = {"t": "hello", "pid": os.getpid(), "token": token,
                       "layout": layout.model_dump(), **exported}  # fmt: skip

    def connect(self, peer: KVDescriptor) -> None:
        if peer.transport is not self.kind:
            raise TransferError(f"cannot reach a {peer.transport.value} receiver over cuda_ipc")
        if self._hello is None:
            raise TransferError("cuda_ipc: register the KV cache before connecting")
        if peer.host and peer.host != socket.gethostname():
            raise TransferError(
                f"cuda_ipc needs both engines on one node; {peer.engine_id} runs on {peer.host}"
            )
        with self._lock:
            link = self._links.get(peer.engine_id)
            if link is not None and link.address == peer.address:
                if link.error is None:
                    return
                # Lost: that receiver is gone (a replacement listens at a new address).
                raise TransferError(f"cuda_ipc: {peer.engine_id} was lost: {link.error}")
        host, _, port = peer.address.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.connect_timeout_s)
        except (OSError, ValueError) as e:
            raise TransferError(f"cuda_ipc: cannot connect to {peer.engine_id}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = sock.makefile("rb")
            _write(sock, self._hello)
            reply = _read(rfile)
            sock.settimeout(None)
        except (OSError, ValueError) as e:
            sock.close()
            raise TransferError(f"cuda_ipc: handshake with {peer.engine_id} failed: {e}") from e
        if reply is None or reply.get("t") != "ready":
            sock.close()
            why = "connection closed" if reply is None else reply.get("reason")
            raise TransferError(f"cuda_ipc: {peer.engine_id} refused the connection: {why}")
        link = _Link(sock, rfile, peer.address)
        with self._lock:
            old = self._links.get(peer.engine_id)
            self._links[peer.engine_id] = link
        if old is not None:
            old.close()

    def _link(self, peer_id: str) -> _Link:
        with self._lock:
            link = self._links.get(peer_id)
        if link is None:
            raise TransferError(f"cuda_ipc: not connected to {peer_id!r}")
        return link

    def send(self, peer_id: str, message: Message, payload: KVPayload | None = None) -> None:
        """Only the header travels: the receiver finds the payload in its mapping of our cache."""
        if isinstance(message, LayerChunk) and not isinstance(payload, KVPayload):
            raise ValueError(f"a LayerChunk needs a KVPayload, got {type(payload).__name__}")
        self._link(peer_id).write({"t": "msg", **to_wire(message)})

    def flush(self, peer_id: str, timeout_s: float) -> None:
        self._link(peer_id).flush(timeout_s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links, self._links = list(self._links.values()), {}
            inbound = list(self._inbound.items())
        for link in links:
            link.close()
        if self._server is not None:
            _shutdown(self._server)  # wakes the accepting thread
            self._server.close()
        for sock, (thread, _) in inbound:
            _shutdown(sock)
            thread.join(timeout=5.0)
        if self._hello is not None:
            _exported.pop(self._hello["token"], None)
