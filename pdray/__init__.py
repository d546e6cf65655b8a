"""pdray: prefill/decode-disaggregated LLM serving on Ray Serve.

Exports resolve lazily, so torch-free parts (scheduler, block manager, router) import without torch.

The repository keeps `kernels/` and `deployments/` at its top level; installed, they are the
subpackages `pdray.kernels` and `pdray.deployments` (pyproject's package-dir), never top-level
packages of their own. A checkout used without installing (PYTHONPATH=the checkout, as on the GPU
hosts) maps the two folders to those names with `_CheckoutFolders`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

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


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """`pdray.kernels` / `pdray.deployments` from the checkout's top-level folders, when neither
    an installed copy nor an editable install's finder provides them (it runs last)."""

    def __init__(self, root: Path):
        self.folders = {f"{__name__}.{name}": root / name for name in ("kernels", "deployments")}

    def find_spec(self, fullname: str, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutFolders(Path(__file__).resolve().parent.parent))
