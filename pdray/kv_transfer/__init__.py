"""KV transfer between prefill and decode engines. Transports import lazily by name."""

from __future__ import annotations

from pdray.kv_transfer.base import FailurePolicy, KVTransport, TransportKind


def make_transport(kind: TransportKind | str, **options) -> KVTransport:
    kind = TransportKind(kind)
    if kind is TransportKind.LOCAL:
        from pdray.kv_transfer.local import LocalTransport

        return LocalTransport(**options)
    if kind is TransportKind.UCX:
        from pdray.kv_transfer.ucx import UcxTransport

        return UcxTransport(**options)
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport

    return CudaIpcTransport(**options)


__all__ = ["FailurePolicy", "KVTransport", "TransportKind", "make_transport"]
