"""The read-bandwidth kernel reads every element: its partial sums add up to the tensor's sum."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import NEEDS_GPU

pytestmark = [pytest.mark.gpu, NEEDS_GPU]


def test_read_all_sums_everything(device):
    from pdray.kernels.bandwidth import read_all

    x = torch.randn(64 * 4096 * 3, generator=torch.Generator().manual_seed(0)).to(device)
    partial = read_all(x, num_programs=64)
    assert torch.allclose(partial.sum(), x.sum(), rtol=1e-4, atol=1e-2)
