"""Counters of KV transfer, per engine side: bytes, time, failures, expired leases, dropped writes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TransferMetrics:
    transport: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    chunks_sent: int = 0
    transfer_time_s: float = 0.0
    completed: int = 0
    failures: int = 0
    expired_leases: int = 0
    dropped_messages: int = 0

    def as_dict(self) -> dict:
        return asdict(self)
