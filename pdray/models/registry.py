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


def _qwen_window(cfg: dict) -> dict:
    """Qwen2/3 slide only the layers `layer_types` marks, or (older configs) those from
    `max_window_layers` (transformers' default 28) on, and only with `use_sliding_window`."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if window is None:
        return {"sliding_window": None}
    first = cfg.get("max_window_layers", 28)
    types = cfg.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention"
        for i in range(cfg["num_hidden_layers"])
    ]
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return {"sliding_window": window, "sliding_window_layers": layers}


def _qwen2_flags(cfg: dict) -> dict:
    return {"qkv_bias": True, **_qwen_window(cfg)}


def _qwen3_flags(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, **_qwen_window(cfg)}


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


# config.json without `architectures`: resolved from `model_type`, as transformers' Auto classes do
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "ernie4_5": "Ernie4_5ForCausalLM",
}


def resolve_architecture(cfg: dict) -> tuple[Family, ModelArch]:
    names = cfg.get("architectures") or []
    if not names and cfg.get("model_type") in MODEL_TYPES:
        names = [MODEL_TYPES[cfg["model_type"]]]
    for name in names:
        if name in ARCHITECTURES:
            family = ARCHITECTURES[name]
            arch = parse_model_arch({**cfg, "architectures": [name]}, **family.flags(cfg))
            return family, arch
    raise ValueError(
        f"unsupported model architecture {names or cfg.get('model_type')!r}; "
        f"supported: {sorted(ARCHITECTURES)}"
    )
