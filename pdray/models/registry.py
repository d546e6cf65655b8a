"""Supported architectures: the `architectures[0]` of config.json -> model class and family flags."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pdray.models.config import ModelArch, parse_model_arch
from pdray.models.llama import DecoderForCausalLM


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type[nn.Module]
    flags: Callable[[dict], dict]


def _llama_flags(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(cfg.get("mlp_bias", False))}


def _mistral_flags(cfg: dict) -> dict:
    return {"sliding_window": cfg.get("sliding_window")}


def _qwen2_flags(cfg: dict) -> dict:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return {"qkv_bias": True, "sliding_window": window}


def _qwen3_flags(cfg: dict) -> dict:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    bias = bool(cfg.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "sliding_window": window}


def _ernie45_flags(cfg: dict) -> dict:
    bias = bool(cfg.get("use_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bias, "rope_interleaved": True}


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", DecoderForCausalLM, _llama_flags),
    "MistralForCausalLM": Family("mistral", DecoderForCausalLM, _mistral_flags),
    "Qwen2ForCausalLM": Family("qwen2", DecoderForCausalLM, _qwen2_flags),
    "Qwen3ForCausalLM": Family("qwen3", DecoderForCausalLM, _qwen3_flags),
    "Ernie4_5ForCausalLM": Family("ernie4_5", DecoderForCausalLM, _ernie45_flags),
}


def resolve_architecture(cfg: dict) -> tuple[Family, ModelArch]:
    names = cfg.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            family = ARCHITECTURES[name]
            arch = parse_model_arch({**cfg, "architectures": [name]}, **family.flags(cfg))
            return family, arch
    raise ValueError(
        f"unsupported model architecture {names or cfg.get('model_type')!r}; "
        f"supported: {sorted(ARCHITECTURES)}"
    )
