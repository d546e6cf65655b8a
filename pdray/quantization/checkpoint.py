"""AWQ and GPTQ int4 checkpoint tensors, converted to pdray's wint4 layout at load.

Both formats store, per linear layer with W [N, K] (out, in features) and group size g:
`qweight` int32, `qzeros` int32, `scales` [K // g, N] (fp16), GPTQ also `g_idx` [K], and
W[n, k] = (code[k, n] - zero[k // g, n]) * scales[k // g, n]. Each int32 holds eight 4-bit
values, the first in its lowest bits. They differ in what they pack together:

- AWQ (AutoAWQ GEMM): `qweight` [K, N // 8] and `qzeros` [K // g, N // 8], eight output columns
  per int32 in the interleaved order nibble i -> column 8c + AWQ_ORDER[i]; zeros as they are.
- GPTQ: `qweight` [K // 8, N], eight input rows per int32 in order (nibble i -> row 8r + i);
  `qzeros` [K // g, N // 8], eight output columns in order; the v1 format ('gptq') stores
  zero - 1, v2 ('gptq_v2') the zero itself. `g_idx` must be k // g (no act-order).

`convert_tensor` maps one checkpoint tensor to pdray's (`int4.py`): `qweight` uint8 [N, K // 2],
`zeros` and `scales` [N, K // g]. The results are whole (unsharded) tensors whose rows are output
features, so the layers' own weight loaders take this rank's slice, as for a weight.
"""

from __future__ import annotations

import torch

from pdray.quantization.int4 import pack
from pdray.quantization.spec import Int4Source, Int4Spec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of an int32 at bit 4i


def unpack_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int64 [R, C, 8]: its eight 4-bit values, lowest bits first."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 tensors are int32, got {packed.dtype}")
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 0xF).long()


def awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, N // 8] -> codes [R, N] with the output columns in their natural order."""
    nibbles = unpack_int32(packed)
    natural = torch.empty_like(nibbles)
    natural[..., list(AWQ_ORDER)] = nibbles  # nibble i holds column AWQ_ORDER[i]
    return natural.flatten(1)


def sequential_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N // 8] packed in order along N -> codes [R, N]."""
    return unpack_int32(packed).flatten(1)


def sequential_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N] packed in order along K -> codes [K, N]."""
    nibbles = unpack_int32(packed)  # [K // 8, N, 8]
    return nibbles.permute(0, 2, 1).reshape(-1, packed.shape[1])


class Int4CheckpointReader:
    """Converts the int4 tensors of one AWQ or GPTQ checkpoint, tensor by tensor."""

    def __init__(self, spec: Int4Spec):
        if spec.source not in (Int4Source.AWQ, Int4Source.GPTQ):
            raise ValueError(f"no int4 checkpoint to read for {spec.source.value}")
        self.spec = spec

    def convert_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(pdray's name, tensor) for a checkpoint tensor; None for one that only needs a check
        (GPTQ's `g_idx`). Tensors of other kinds pass through."""
        awq = self.spec.source is Int4Source.AWQ
        if name.endswith(".qweight"):
            codes = awq_columns(tensor) if awq else sequential_rows(tensor)  # [K, N]
            return name, pack(codes.t())
        if name.endswith(".qzeros"):
            zeros = awq_columns(tensor) if awq else sequential_columns(tensor)  # [K // g, N]
            zeros = zeros + self.spec.zero_offset
            return name.removesuffix(".qzeros") + ".zeros", zeros.t().float()
        if name.endswith(".scales"):
            return name, tensor.t()
        if name.endswith(".g_idx"):
            self._check_g_idx(tensor)
            return None
        return name, tensor

    def _check_g_idx(self, g_idx: torch.Tensor) -> None:
        trivial = torch.arange(g_idx.numel(), device=g_idx.device) // self.spec.group_size
        if not torch.equal(g_idx.long(), trivial):
            raise ValueError(
                "g_idx is not k // group_size (an act-order GPTQ checkpoint, whose input "
                "features are permuted across groups); pdray's int4 layout cannot hold it"
            )
