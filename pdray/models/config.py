"""The model facts the engine needs, read from a Hugging Face config.json without transformers.

Rope settings come in two spellings: `rope_theta` + `rope_scaling` (checkpoints before
transformers 5) and `rope_parameters` (transformers 5). Both are accepted. A `quantization_config`
(AWQ or GPTQ int4) is read into `int4_checkpoint`, or refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pdray.quantization.spec import Int4Spec, checkpoint_int4_spec


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_interleaved: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None  # the layers it applies to; None: all
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    int4_checkpoint: Int4Spec | None = None  # the checkpoint holds AWQ/GPTQ int4 linear weights

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        if self.sliding_window_layers is not None and layer_idx not in self.sliding_window_layers:
            return None
        return self.sliding_window


def read_config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir}: no config.json (is this a Hugging Face model directory?)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or None
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = params
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def parse_model_arch(cfg: dict, **family_flags) -> ModelArch:
    """Common decoder fields; `family_flags` set what the registry knows per architecture."""
    try:
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        theta, scaling = _rope(cfg)
        return ModelArch(
            architecture=cfg["architectures"][0],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg),
            int4_checkpoint=checkpoint_int4_spec(cfg.get("quantization_config")),
            **family_flags,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the key {e.args[0]!r}") from None
