from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdray.layers.fused import fused_ops


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate | up) -> silu(gate) * up, [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_ops(x)
        if fused is not None:
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
