"""OpenAI-compatible serving: protocol models (`protocol`), the FastAPI app (`api`).

Exports resolve lazily so that importing the protocol models does not import FastAPI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_openai_app": "pdray.entrypoints.openai.api",
    "ServingBackend": "pdray.entrypoints.openai.api",
    "LocalEngineBackend": "pdray.entrypoints.openai.local_backend",
    "NoCapacityError": "pdray.entrypoints.openai.protocol",
    "InvalidRequestError": "pdray.entrypoints.openai.protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pdray.entrypoints.openai' has no attribute {name!r}")
