"""`local` transport: sender and receiver in one process; a send is a direct call.

A chunk's payload is the sender's cache and the chunk's source block ids (`cache_payload`), so
the receiver's gather/scatter out of it is the only copy. Used by tests and for a prefill and a
decode engine sharing one process.
"""

from __future__ import annotations

import threading

import torch

from pdray.kv_transfer.base import (
    KVDescriptor,
    KVLayout,
    KVPayload,
    KVTransport,
    Message,
    OnMessage,
    TransferError,
    TransportKind,
)

_receivers: dict[str, OnMessage] = {}
_lock = threading.Lock()


class LocalTransport(KVTransport):
    kind = TransportKind.LOCAL

    def __init__(self) -> None:
        self._listening: str | None = None

    def listen(
        self,
        engine_id: str,
        kv_cache: torch.Tensor,
        on_message: OnMessage,
        layout: KVLayout | None = None,
    ) -> KVDescriptor:
        with _lock:
            if engine_id in _receivers:
                raise ValueError(f"a local KV receiver named {engine_id!r} already exists")
            _receivers[engine_id] = on_message
        self._listening = engine_id
        return KVDescriptor(
            engine_id=engine_id,
            transport=self.kind,
            layout=layout or KVLayout.of(kv_cache),
            address=engine_id,
        )

    def register(self, kv_cache: torch.Tensor, layout: KVLayout | None = None) -> None:
        pass

    def connect(self, peer: KVDescriptor) -> None:
        if peer.transport is not self.kind:
            raise TransferError(f"cannot reach a {peer.transport.value} receiver over local")
        with _lock:
            if peer.engine_id not in _receivers:
                raise TransferError(
                    f"no local KV receiver named {peer.engine_id!r} in this process"
                )

    def send(self, peer_id: str, message: Message, payload: KVPayload | None = None) -> None:
        with _lock:
            on_message = _receivers.get(peer_id)
        if on_message is None:
            raise TransferError(f"local KV receiver {peer_id!r} is gone")
        on_message(message, payload)

    def flush(self, peer_id: str, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        if self._listening is not None:
            with _lock:
                _receivers.pop(self._listening, None)
            self._listening = None
