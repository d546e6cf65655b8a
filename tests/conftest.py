from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, the kernel tests run through Triton's interpreter when Triton is installed (the
# `test` extra installs it, so CI runs them). The interpreter is chosen when a kernel is defined,
# so this comes before any test module imports one.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from factory import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, **kw) -> path of a tiny random HF checkpoint, built once per variant."""
    cache: dict[tuple, Path] = {}

    def build(family: str, **kwargs) -> Path:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(family.replace(".", "_"))
            cache[key] = make_checkpoint(family, path, **kwargs)
        return cache[key]

    return build
