"""Triton fused small ops (kernels/fused.py) for CUDA tensors; None on CPU or without Triton.

Layers call `fused_ops(x)` and fall back to their plain-torch code when it returns None, so CPU
runs never import Triton.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

_module: ModuleType | None = None
_checked = False
_enabled = True


def set_fused_ops_enabled(enabled: bool) -> None:
    """Benchmarks turn the fused kernels off to measure what they bring."""
    global _enabled
    _enabled = enabled


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    global _module, _checked
    if not (_enabled and x.is_cuda):
        return None
    if not _checked:
        _checked = True
        if importlib.util.find_spec("triton") is not None:
            from pdray.kernels import fused

            _module = fused
    return _module
