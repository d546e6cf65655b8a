"""Attention backends by name. Heavy ones import lazily, only when chosen."""

from __future__ import annotations

from pdray.attention.base import AttentionBackend

BACKENDS = ("auto", "torch")


def get_attention_backend(name: str, device_type: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    from pdray.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
