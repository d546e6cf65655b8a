"""KV transfer between prefill and decode engines. Transports import lazily by name."""

from __future__ import annotations

from pdray.kv_transfer.base import FailurePolicy, KVTransport, TransportKind


def make_transport(kind: TransportKind | str, **options) -> KVTransport:
    """A transport of `kind`; its `spec` (kind, options) makes the same one in another process
    (the other ranks of a tensor-parallel engine)."""
    kind = TransportKind(kind)
    if kind is TransportKind.LOCAL:
        from pdray.kv_transfer.local import LocalTransport as cls
    elif kind is TransportKind.UCX:
        from pdray.kv_transfer.ucx import UcxTransport as cls
    else:
        from pdray.kv_transfer.cuda_ipc import CudaIpcTransport as cls
    transport = cls(**options)
    transport.spec = (kind.value, options)
    return transport


__all__ = ["FailurePolicy", "KVTransport", "TransportKind", "make_transport"]
