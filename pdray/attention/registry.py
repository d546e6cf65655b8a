"""Attention backends by name. Heavy ones import lazily, only when chosen.

- `torch`: the plain-torch reference; the CPU default.
- `triton`: Triton paged kernels (`kernels/`); the CUDA default.
- `vllm_flash_attn`: vLLM's flash-attention, offered only when that package imports.
`auto` picks `triton` on CUDA (when Triton imports) and `torch` elsewhere. Triton is never imported
on a CPU engine.
"""

from __future__ import annotations

import importlib.util

from pdray.attention.base import AttentionBackend

BACKENDS = ("auto", "torch", "triton", "vllm_flash_attn")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend_name(name: str, device_type: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device_type == "cuda" and _importable("triton") else "torch"
    if name != "torch" and device_type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device, got {device_type!r}")
    if name == "triton" and not _importable("triton"):
        raise ValueError(
            "attention_backend='triton' needs the `triton` package (pip install triton)"
        )
    if name == "vllm_flash_attn" and not _importable("vllm_flash_attn"):
        raise ValueError(
            "attention_backend='vllm_flash_attn' needs the `vllm-flash-attn` package; "
            "use 'triton' or 'auto'"
        )
    return name


def get_attention_backend(
    name: str, device_type: str, device: object | None = None
) -> AttentionBackend:
    name = resolve_backend_name(name, device_type)
    if name == "torch":
        from pdray.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    from pdray.attention import triton_backend

    cls = (
        triton_backend.TritonAttentionBackend
        if name == "triton"
        else triton_backend.VllmFlashAttnBackend
    )
    return cls(device if device is not None else "cuda")
