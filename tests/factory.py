from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pdray.models.dummy_tokenizer import build_tokenizer

FAMILIES: tuple[str, ...] = (
    "llama2",
    "llama3",
    "llama3.1",
    "llama3.2",
    "mistral",
    "qwen2",
    "qwen3",
    "ernie4_5",
)

WEIGHT_STD = 0.2
BIAS_STD = 0.1

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def _default_rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


_FAMILY_SPECS: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "llama2": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_parameters": _default_rope(10000.0),
        },
    ),
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_parameters": _default_rope(500000.0),
        },
    ),
    "llama3.1": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_parameters": _llama3_rope(8.0)},
    ),
    "llama3.2": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_parameters": _llama3_rope(32.0)},
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "sliding_window": None,
            "rope_parameters": _default_rope(1000000.0),
        },
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"tie_word_embeddings": False, "rope_parameters": _default_rope(1000000.0)},
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {
            "head_dim": 32,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "rope_parameters": _default_rope(1000000.0),
        },
    ),
    "ernie4_5": (
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
        {
            "head_dim": 16,
            "use_bias": False,
            "tie_word_embeddings": True,
            "rope_parameters": _default_rope(500000.0),
        },
    ),
}


class RopeSpelling(Enum):
    """How config.json spells the rope settings (pdray and transformers read both)."""

    PARAMETERS = "parameters"  # transformers 5: "rope_parameters": {"rope_type", "rope_theta", ...}
    LEGACY = (
        "legacy"  # top-level "rope_theta" + "rope_scaling" (null if default), as Llama 3.x ship
    )
    LEGACY_TYPE = "legacy_type"  # LEGACY with the older key "type" for "rope_type"

    def __repr__(self) -> str:  # as code, for replay messages
        return f"{type(self).__name__}.{self.name}"


# name -> (family, make_checkpoint overrides): what README claims beyond the families' defaults
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral-sliding16": ("mistral", {"sliding_window": 16}),
    "qwen2-sliding16-top": (  # the window only from layer max_window_layers on
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    ),
    "llama3-linear-rope": (
        "llama3",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}},
    ),
    "llama3-legacy-rope": ("llama3", {"rope_spelling": RopeSpelling.LEGACY}),
    "llama3.1-legacy-rope": ("llama3.1", {"rope_spelling": RopeSpelling.LEGACY}),
    "llama3.1-legacy-type": ("llama3.1", {"rope_spelling": RopeSpelling.LEGACY_TYPE}),
    "llama3.1-legacy-real": (  # Llama-3.1-8B's own rope settings
        "llama3.1",
        {
            "rope_spelling": RopeSpelling.LEGACY,
            "max_position_embeddings": 131072,
            "rope_parameters": {**_llama3_rope(8.0), "original_max_position_embeddings": 8192},
        },
    ),
    "llama3-linear-legacy-type": (
        "llama3",
        {
            "rope_spelling": RopeSpelling.LEGACY_TYPE,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0},
        },
    ),
    "ernie4_5-bias": ("ernie4_5", {"use_bias": True}),
}


def _respell_rope(path: Path, spelling: RopeSpelling) -> None:
    """Rewrite config.json's rope settings from `rope_parameters` into a legacy spelling."""
    if spelling is RopeSpelling.PARAMETERS:
        return
    config_path = path / "config.json"
    cfg = json.loads(config_path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    key = "type" if spelling is RopeSpelling.LEGACY_TYPE else "rope_type"
    cfg["rope_scaling"] = None if rope_type == "default" else {key: rope_type, **params}
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim >= 2:
                noise = torch.randn(param.shape, generator=gen) * WEIGHT_STD
            elif name.endswith("bias"):
                noise = torch.randn(param.shape, generator=gen) * BIAS_STD
            else:
                noise = torch.rand(param.shape, generator=gen) + 0.5
            param.copy_(noise)


def _shard(path: Path, num_shards: int) -> None:
    single = path / "model.safetensors"
    tensors = load_file(single)
    names = sorted(tensors)
    if num_shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} shards")
    bounds = [round(i * len(names) / num_shards) for i in range(num_shards + 1)]
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[bounds[i] : bounds[i + 1]]}
        save_file(chunk, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


def make_config(family: str, *, vocab_size: int = 384, **overrides: Any) -> PreTrainedConfig:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config_cls, _, family_kwargs = _FAMILY_SPECS[family]
    tok = build_tokenizer(vocab_size)
    kwargs: dict[str, Any] = {
        **_COMMON,
        **family_kwargs,
        "vocab_size": vocab_size,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **overrides,
    }
    config = config_cls(**kwargs)
    config.dtype = torch.float32
    return config


def make_checkpoint(
    family: str,
    path: str | Path,
    *,
    num_shards: int = 1,
    seed: int = 0,
    vocab_size: int = 384,
    rope_spelling: RopeSpelling = RopeSpelling.PARAMETERS,
    **overrides: Any,
) -> Path:
    """Write a tiny random float32 HF checkpoint (config, weights, tokenizer) into `path`.

    The weights depend only on `seed` and the parameter shapes, so checkpoints that differ only in
    config (rope, sliding window, spelling) hold the same weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = make_config(family, vocab_size=vocab_size, **overrides)
    model_cls = _FAMILY_SPECS[family][1]
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    _respell_rope(path, rope_spelling)
    if num_shards > 1:
        _shard(path, num_shards)
    build_tokenizer(vocab_size).save_pretrained(path)
    return path


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations by transformers, ignoring EOS: exactly `max_new_tokens` per prompt."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    outputs: list[list[int]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                eos_token_id=None,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
            assert len(outputs[-1]) == max_new_tokens
    return outputs
