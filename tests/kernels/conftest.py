from __future__ import annotations

import pytest
from kernel_utils import HAS_CUDA, INTERPRET


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"
