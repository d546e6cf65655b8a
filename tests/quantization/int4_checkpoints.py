"""Tiny int4 checkpoints for the wint4 tests, written here from the formats' definitions (not with
pdray's code), next to full-precision "reference" checkpoints whose linear weights are exactly
the dequantized int4 weights, for transformers to run as the plain-torch reference.

Formats, for a linear weight W [N, K] (out, in) in groups of g input features,
W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]:
- AWQ (GEMM): qweight int32 [K, N // 8], qzeros int32 [K // g, N // 8]: word c of a row holds
  columns 8c..8c+7, column 8c + AWQ_PACK_ORDER[i] in bits 4i..4i+3; scales fp16 [K // g, N].
- GPTQ: qweight int32 [K // 8, N]: word r of a column holds rows 8r..8r+7, row 8r + i in bits
  4i..4i+3; qzeros int32 [K // g, N // 8], column 8c + i in bits 4i..4i+3, holding zero - 1
  (format v1, "gptq") or zero ("gptq_v2"); scales fp16 [K // g, N]; g_idx int32 [K] = k // g.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES


def rtn(weight: torch.Tensor, group_size: int, symmetric: bool):
    """Round-to-nearest int4 per group, written from its definition: (codes, zeros, scales),
    codes [N, K] and zeros [N, K // g] as int64, scales [N, K // g] float32."""
    n, k = weight.shape
    groups = weight.double().reshape(n, k // group_size, group_size)
    if symmetric:
        scales = groups.abs().amax(-1) / 7
        zeros = torch.full_like(scales, 8)
    else:
        low = torch.minimum(groups.amin(-1), torch.zeros(()))
        high = torch.maximum(groups.amax(-1), torch.zeros(()))
        scales = (high - low) / 15
        zeros = torch.round(-low / scales).clamp(0, 15)
    codes = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return codes.reshape(n, k).long(), zeros.long(), scales.float()


def dequantized(codes, zeros, scales, group_size: int) -> torch.Tensor:
    zero = zeros.repeat_interleave(group_size, dim=1)
    scale = scales.float().repeat_interleave(group_size, dim=1)
    return (codes - zero).float() * scale


def _words(nibbles: np.ndarray) -> torch.Tensor:
    """[..., 8] values in [0, 15], nibble i -> bits 4i..4i+3 of an int32 (two's complement)."""
    word = np.zeros(nibbles.shape[:-1], dtype=np.uint64)
    for i in range(8):
        word |= (nibbles[..., i].astype(np.uint64) & 0xF) << np.uint64(4 * i)
    return torch.from_numpy(word.astype(np.uint32).view(np.int32).copy())


def awq_pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, N] -> int32 [R, N // 8] in AWQ's interleaved column order."""
    v = values.numpy().reshape(values.shape[0], -1, 8)
    return _words(v[..., AWQ_PACK_ORDER])


def gptq_pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[K, N] -> int32 [K // 8, N], eight consecutive rows per word."""
    v = values.numpy().reshape(-1, 8, values.shape[1])
    return _words(np.moveaxis(v, 1, -1))


def gptq_pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, N] -> int32 [R, N // 8], eight consecutive columns per word."""
    return _words(values.numpy().reshape(values.shape[0], -1, 8))


def _copy_aux(src: Path, dst: Path) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return json.loads((src / "config.json").read_text())


def write_int4_checkpoints(
    src: Path,
    int4_dir: Path,
    reference_dir: Path,
    *,
    method: str,
    group_size: int,
    symmetric: bool = False,
    gptq_format: str = "gptq",
) -> None:
    """From the full-precision checkpoint `src`: an AWQ ("awq") or GPTQ ("gptq") checkpoint in
    `int4_dir`, and in `reference_dir` the same model with the dequantized linear weights."""
    config = _copy_aux(src, int4_dir)
    _copy_aux(src, reference_dir)
    tensors = load_file(src / "model.safetensors")
    packed, reference = {}, {}
    for name, tensor in tensors.items():
        if not is_linear_weight(name):
            packed[name] = reference[name] = tensor
            continue
        codes, zeros, scales = rtn(tensor, group_size, symmetric)
        scales = scales.half()  # both formats store fp16 scales
        reference[name] = dequantized(codes, zeros, scales, group_size)
        prefix = name.removesuffix("weight")
        k = tensor.shape[1]
        if method == "awq":
            packed[prefix + "qweight"] = awq_pack_columns(codes.t())
            packed[prefix + "qzeros"] = awq_pack_columns(zeros.t())
        else:
            stored = zeros - 1 if gptq_format == "gptq" else zeros
            packed[prefix + "qweight"] = gptq_pack_rows(codes.t())
            packed[prefix + "qzeros"] = gptq_pack_columns(stored.t())
            packed[prefix + "g_idx"] = torch.arange(k, dtype=torch.int32) // group_size
        packed[prefix + "scales"] = scales.t().contiguous()
    save_file({n: t.contiguous() for n, t in packed.items()}, int4_dir / "model.safetensors")
    save_file(reference, reference_dir / "model.safetensors")
    if method == "awq":
        qcfg = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
    else:
        qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                "sym": symmetric, "checkpoint_format": gptq_format}  # fmt: skip
    config["quantization_config"] = qcfg
    config["torch_dtype"] = "float16"
    (int4_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_rtn_reference(
    src: Path, dst: Path, group_size_of, symmetric: bool = False, lm_head: bool = False
) -> None:
    """`src` with each linear weight W replaced by its round-to-nearest int4 dequantized, in
    groups of `group_size_of(in_features)`: what a wint4 engine (one rank) must compute. With
    `lm_head` the LM head too (`quantize_lm_head`); a tied head becomes its own tensor, the
    embedding staying full precision."""
    config = _copy_aux(src, dst)
    tensors = load_file(src / "model.safetensors")

    def rounded(tensor):
        g = group_size_of(tensor.shape[1])
        codes, zeros, scales = rtn(tensor, g, symmetric)
        return dequantized(codes, zeros, scales, g)

    out = {name: rounded(t) if is_linear_weight(name) else t for name, t in tensors.items()}
    if lm_head:
        out["lm_head.weight"] = rounded(tensors.get("lm_head.weight",
                                                    tensors["model.embed_tokens.weight"]))  # fmt: skip
        if config.get("tie_word_embeddings"):
            config["tie_word_embeddings"] = False
            (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(out, dst / "model.safetensors")
