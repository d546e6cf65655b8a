"""Which int4 weights a model's linear layers hold, and where they come from.

An `Int4Spec` is decided once per model, before it is built: from config.json's
`quantization_config` (an AWQ or GPTQ int4 checkpoint: the layers are built in pdray's int4
layout and the checkpoint's tensors are converted into it, see `checkpoint.py`), or from the engine
argument `quantization="wint4"` on a full-precision checkpoint (the layers load the full-precision
weights as usual, then quantize them by round-to-nearest, see `Int4Source.RTN`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pdray.config import Quantization

# Group sizes the int4 kernels take (and that `choose_group_size` picks from).
GROUP_SIZES = (32, 64, 128)


class Int4Source(str, enum.Enum):
    RTN = "rtn"  # a full-precision checkpoint, rounded to nearest per group at load
    AWQ = "awq"  # AutoAWQ GEMM int32 packing (checkpoint.py)
    GPTQ = "gptq"  # AutoGPTQ / GPTQModel int32 packing, desc_act false (checkpoint.py)


@dataclass(frozen=True, slots=True)
class Int4Spec:
    """How the linear layers of one model hold int4 weights.

    `group_size` None: each layer picks its own from the input features it holds on its rank
    (128, else 64, else 32); a checkpoint's group size is the same for every layer.
    `symmetric` applies to RTN only (zero 8, scale max|w| / 7; else zero and scale from the
    group's min and max). `zero_offset` is added to a checkpoint's stored zeros (GPTQ's v1 format
    stores zero - 1).
    """

    source: Int4Source
    group_size: int | None = None
    symmetric: bool = False
    zero_offset: int = 0

    @property
    def quantize_at_load(self) -> bool:
        return self.source is Int4Source.RTN

    def group_size_for(self, in_features: int, layer: str) -> int:
        """The group size of a layer holding `in_features` input features on this rank; a
        ValueError if its groups cannot be whole."""
        sizes = GROUP_SIZES if self.group_size is None else (self.group_size,)
        for size in reversed(sizes):
            if in_features % size == 0:
                return size
        if self.group_size is None:
            groups = "wint4 quantizes groups of 128, 64 or 32 inputs"
        else:
            groups = f"this {self.source.value} checkpoint has groups of {self.group_size} inputs"
        raise ValueError(
            f"{layer}: {groups}, so the input features a linear layer holds on each "
            f"tensor-parallel rank must be a multiple of {sizes[0]}; this one holds {in_features} "
            "(with tensor parallelism, fewer ranks may fit; or run without quantization)"
        )


def resolve_int4_spec(
    checkpoint: Int4Spec | None, quantization: Quantization | None
) -> Int4Spec | None:
    """The spec a model is built with: an int4 checkpoint's own, else RTN when the engine asks
    for `Quantization.WINT4`, else None (full precision)."""
    if checkpoint is not None:
        return checkpoint
    if quantization is Quantization.WINT4:
        return Int4Spec(Int4Source.RTN)
    return None


def checkpoint_int4_spec(quantization_config: dict | None) -> Int4Spec | None:
    """The spec of a checkpoint whose config.json has `quantization_config` (None without one);
    a ValueError naming what is unsupported otherwise."""
    if not quantization_config:
        return None
    qcfg = dict(quantization_config)
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "awq":
        return _awq_spec(qcfg)
    if method == "gptq":
        return _gptq_spec(qcfg)
    raise ValueError(
        f"config.json: quantization_config.quant_method {qcfg.get('quant_method')!r} is not "
        "supported; pdray loads 4-bit 'awq' (version gemm) and 'gptq' (desc_act false) "
        "checkpoints, and quantizes full-precision ones with quantization='wint4'"
    )


def _bad(method: str, what: str) -> ValueError:
    return ValueError(f"config.json: {method} quantization_config {what}")


def _bits_and_group(qcfg: dict, method: str) -> int:
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if bits != 4:
        raise _bad(method, f"has bits={bits!r}; pdray's int4 layout holds 4-bit weights only")
    group_size = qcfg.get("group_size", qcfg.get("q_group_size"))
    if group_size not in GROUP_SIZES:
        raise _bad(
            method,
            f"has group_size={group_size!r}; pdray's int4 kernels take group sizes "
            f"{', '.join(map(str, GROUP_SIZES))} (not -1, one group per row)",
        )
    return group_size


def _awq_spec(qcfg: dict) -> Int4Spec:
    group_size = _bits_and_group(qcfg, "AWQ")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise _bad("AWQ", f"has version={version!r}; only 'gemm' packing is supported")
    if qcfg.get("zero_point", True) is not True:
        raise _bad("AWQ", "has zero_point=false; only AWQ with zero points is supported")
    return Int4Spec(Int4Source.AWQ, group_size=group_size)


def _gptq_spec(qcfg: dict) -> Int4Spec:
    group_size = _bits_and_group(qcfg, "GPTQ")
    if qcfg.get("desc_act"):
        raise _bad(
            "GPTQ",
            "has desc_act=true (act-order): its g_idx permutes the input features across "
            "groups, which pdray's int4 layout cannot hold; use a desc_act=false checkpoint",
        )
    if qcfg.get("lm_head"):
        raise _bad("GPTQ", "quantizes the LM head (lm_head=true); pdray keeps it full precision")
    if qcfg.get("dynamic"):
        raise _bad("GPTQ", "has per-module overrides (dynamic); they are not supported")
    layout = str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))).lower()
    if layout not in ("gptq", "gptq_v2"):
        raise _bad("GPTQ", f"has checkpoint format {layout!r}; supported: 'gptq', 'gptq_v2'")
    return Int4Spec(
        Int4Source.GPTQ,
        group_size=group_size,
        symmetric=bool(qcfg.get("sym", True)),
        zero_offset=1 if layout == "gptq" else 0,
    )
