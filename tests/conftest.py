from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
