"""config.json read as transformers reads it: rope settings in every spelling real checkpoints use
give transformers' frequencies, and Qwen's sliding window covers only the layers transformers
slides. Greedy parity on these variants is in test_parity.py; these pin the parsed values, and
the Qwen window of configs without `layer_types` end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from factory import hf_greedy, make_checkpoint
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pdray import LLM, SamplingParams
from pdray.layers.rotary import rope_inv_freq
from pdray.models.registry import resolve_architecture

LLAMA31_ROPE = {  # Llama-3.1-8B's config.json
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama_config(**rope: object) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 131072,
        **rope,
    }


ROPE_SPELLINGS = {
    "llama3-parameters": (
        "llama3",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA31_ROPE}},
    ),
    "llama3-legacy": (
        "llama3",
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA31_ROPE}},
    ),
    "llama3-legacy-type": (
        "llama3",
        {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA31_ROPE}},
    ),
    "linear-parameters": (
        "linear",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "linear-legacy-type": (
        "linear",
        {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ),
    "default-legacy-null": ("default", {"rope_theta": 500000.0, "rope_scaling": None}),
    "default-legacy-theta-only": ("default", {"rope_theta": 500000.0}),
    "default-parameters": (
        "default",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    ),
    "default-unset": ("default", {}),
}


@pytest.mark.parametrize("name", sorted(ROPE_SPELLINGS))
def test_rope_frequencies_match_transformers(name: str) -> None:
    rope_type, rope = ROPE_SPELLINGS[name]
    cfg = llama_config(**rope)
    _, arch = resolve_architecture(cfg)
    ours = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    hf_config = LlamaConfig.from_dict(cfg)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS.get(rope_type, _hf_default)(hf_config)
    assert attention_factor == 1.0
    assert (arch.rope_scaling or {}).get("rope_type", "default") == rope_type
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


def _hf_default(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    theta = config.rope_parameters["rope_theta"]
    dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


def qwen2_config(num_layers: int = 4, **window: object) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        **window,
    }


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({}, [None] * 4),
        ({"use_sliding_window": False, "sliding_window": 16}, [None] * 4),
        ({"use_sliding_window": True, "sliding_window": 16}, [None] * 4),  # default 28 layers
        ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, [16] * 4),
        (
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
            [None, None, 16, 16],
        ),
        (
            {
                "use_sliding_window": True,
                "sliding_window": 16,
                "max_window_layers": 2,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
            },
            [16, None, 16, None],
        ),
    ],
)
def test_qwen_sliding_window_layers(window: dict, expected: list[int | None]) -> None:
    _, arch = resolve_architecture(qwen2_config(**window))
    assert [arch.layer_sliding_window(i) for i in range(4)] == expected


def test_qwen_window_without_layer_types_matches_transformers(tmp_path: Path) -> None:
    """A config from before `layer_types`: the window from layer `max_window_layers` on."""
    path = make_checkpoint(
        "qwen2",
        tmp_path,
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
    )
    config_path = path / "config.json"
    cfg = json.loads(config_path.read_text())
    assert cfg.pop("layer_types") == ["full_attention"] + ["sliding_attention"] * 2
    config_path.write_text(json.dumps(cfg, indent=2))
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (5, 30, 60)]
    expected = hf_greedy(path, prompts, 8)
    llm = LLM(str(path), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected, f"qwen2 3 layers, window 16 from layer 1; prompts {prompts}"


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3", "ernie4_5"])
def test_config_without_architectures_resolves_from_model_type(tmp_path: Path, family) -> None:
    """As transformers' Auto classes do: no `architectures`, the family from `model_type`."""
    path = make_checkpoint(family, tmp_path)
    config_path = path / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg.pop("architectures")
    config_path.write_text(json.dumps(cfg, indent=2))
    prompts = [[5, 6, 7, 8, 9], list(range(20, 50))]
    expected = hf_greedy(path, prompts, 6)
    llm = LLM(str(path), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected, f"{family} without architectures"


def test_unknown_model_type_without_architectures_is_named() -> None:
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        resolve_architecture({"model_type": "gpt2"})
