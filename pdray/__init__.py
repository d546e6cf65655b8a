"""pdray: prefill/decode-disaggregated LLM serving on Ray Serve.

Exports resolve lazily, so torch-free parts (scheduler, block manager, router) import without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "pdray.entrypoints.llm",
    "SamplingParams": "pdray.sampling_params",
    "RequestOutput": "pdray.outputs",
    "CompletionOutput": "pdray.outputs",
    "Logprob": "pdray.outputs",
    "EngineConfig": "pdray.config",
    "Role": "pdray.config",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pdray' has no attribute {name!r}")
