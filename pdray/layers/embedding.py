"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdray.quantization.int4 import Int4Weight, quantize
from pdray.quantization.linear import int4_linear, set_int4_params
from pdray.quantization.spec import Int4Spec
from pdray.worker.parallel import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.shard_size = -(-vocab_size // tp_size())
        self.vocab_start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.vocab_size:
            raise ValueError(
                f"{type(self).__name__}: checkpoint shape {tuple(loaded.shape)}, "
                f"expected ({self.vocab_size}, {param.shape[1]})"
            )
        part = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def full_shards(self) -> list[tuple[object, tuple[int, ...]]]:
        """(shard_id, shape) of the unsharded checkpoint tensor (see LinearBase.full_shards)."""
        return [(None, (self.vocab_size, self.weight.shape[1]))]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """The vocab slice's logits; after `quantize`, from an int4 copy of the weight."""

    int4_group_size: int | None = None  # set by `quantize`

    def quantize(self, int4: Int4Spec, tied: bool) -> None:
        """Replace the loaded weight by its round-to-nearest int4 `qweight`, `scales`, `zeros`
        (pdray/quantization/int4.py) for the head's matmul; `tied`: the weight is also the
        embedding's and stays, else it is freed."""
        group = int4.group_size_for(self.weight.shape[1], type(self).__name__)
        set_int4_params(self, quantize(self.weight.data, group, int4.symmetric))
        self.int4_group_size = group
        if not tied:
            self.weight = None  # registered as no parameter: the full-precision head is gone

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.int4_group_size is None:
            logits = F.linear(hidden, self.weight)
        else:
            logits = int4_linear(hidden, Int4Weight(self.qweight, self.scales, self.zeros))
        logits = all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
