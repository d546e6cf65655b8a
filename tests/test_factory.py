from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from pdray.models.dummy_tokenizer import build_tokenizer
from tests.factory import FAMILIES, VARIANTS, RopeSpelling, hf_greedy, make_checkpoint

PROMPTS = [[1, 77, 106, 282], [1, 300, 12, 45, 99, 200], [3, 120, 126, 326, 106, 4, 15]]
TEXT = (
    "Hello world! The answer: 42 — naïve café, 日本語テキスト, emoji 🙂👍🏽 and\ttabs\n\n  spaces."
)


def _tensor_names(path: Path) -> set[str]:
    names: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return names


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_checkpoint(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        name: make_checkpoint(family, root / name, **overrides)
        for name, (family, overrides) in VARIANTS.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generates(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file()
    outs = hf_greedy(path, PROMPTS, 12)
    assert [len(o) for o in outs] == [12, 12, 12]
    assert all(0 <= t < 384 for o in outs for t in o)
    assert len({tuple(o) for o in outs}) == 3
    assert all(len(set(o)) > 2 for o in outs)
    assert hf_greedy(path, PROMPTS[:1], 12) == outs[:1]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_config(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    cfg = json.loads((path / "config.json").read_text())
    names = _tensor_names(path)
    tok = build_tokenizer(384)
    assert cfg["dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert cfg["vocab_size"] == 384 and cfg["hidden_size"] == 64
    assert "rope_scaling" not in cfg and "rope_theta" not in cfg
    rope = cfg["rope_parameters"]
    tied = family in ("llama3.2", "ernie4_5")
    assert cfg["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in names) is not tied
    assert ("model.layers.0.self_attn.q_proj.bias" in names) is (family == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) is (family == "qwen3")
    with safe_open(str(path / "model.safetensors"), framework="pt") as sf:
        q_shape = sf.get_tensor("model.layers.0.self_attn.q_proj.weight").shape
        k_shape = sf.get_tensor("model.layers.0.self_attn.k_proj.weight").shape
    head_dim = 32 if family == "qwen3" else 16
    kv_heads = 4 if family == "llama2" else 2
    assert cfg.get("head_dim", 16 if family == "qwen2" else None) == head_dim
    assert tuple(q_shape) == (4 * head_dim, 64)
    assert tuple(k_shape) == (kv_heads * head_dim, 64)
    assert cfg["num_key_value_heads"] == kv_heads
    if family in ("llama3.1", "llama3.2"):
        assert rope["rope_type"] == "llama3"
        assert rope["original_max_position_embeddings"] == 64
        assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
        assert rope["factor"] == (8.0 if family == "llama3.1" else 32.0)
    else:
        assert rope["rope_type"] == "default"
    if family == "ernie4_5":
        assert cfg["model_type"] == "ernie4_5" and cfg["use_bias"] is False


def test_llama3_rope_scaling_changes_frequencies(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(checkpoints["llama3.1"])
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    ratio = (inv_freq / base).tolist()
    assert ratio[0] == pytest.approx(1.0)
    assert 0.125 < ratio[1] < 1.0
    assert ratio[-1] == pytest.approx(0.125)
    assert hf_greedy(checkpoints["llama3.1"], PROMPTS, 8) != hf_greedy(
        checkpoints["llama3"], PROMPTS, 8
    )


def test_sharding(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = make_checkpoint("llama3", tmp_path / "sharded", num_shards=3)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == _tensor_names(path) == _tensor_names(checkpoints["llama3"])
    assert index["metadata"]["total_size"] > 0
    assert hf_greedy(path, PROMPTS, 8) == hf_greedy(checkpoints["llama3"], PROMPTS, 8)


def test_seed_changes_weights(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = make_checkpoint("qwen2", tmp_path / "seed1", seed=1)
    same = make_checkpoint("qwen2", tmp_path / "seed0", seed=0)
    name = "model.embed_tokens.weight"
    with (
        safe_open(str(path / "model.safetensors"), framework="pt") as a,
        safe_open(str(same / "model.safetensors"), framework="pt") as b,
        safe_open(str(checkpoints["qwen2"] / "model.safetensors"), framework="pt") as c,
    ):
        assert not torch.equal(a.get_tensor(name), c.get_tensor(name))
        assert torch.equal(b.get_tensor(name), c.get_tensor(name))


def test_overrides(tmp_path: Path) -> None:
    path = make_checkpoint("mistral", tmp_path / "ov", num_hidden_layers=3, vocab_size=512)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == 512
    assert len(AutoTokenizer.from_pretrained(path)) == 512


@pytest.mark.parametrize("vocab_size", [261, 384, 1000, 32000])
def test_tokenizer_vocab(vocab_size: int) -> None:
    tok = build_tokenizer(vocab_size)
    assert tok.vocab_size == len(tok) == vocab_size
    ids = list(range(vocab_size))
    assert isinstance(tok.decode(ids), str)
    special = set(tok.all_special_ids)
    assert special == {0, 1, 2, 3, 4}
    pieces = [tok.decode([i]) for i in ids if i not in special]
    assert all(pieces)
    if vocab_size >= 1000:
        assert tok.decode([vocab_size - 1]) == f" w{vocab_size - 1}"


def test_tokenizer_large_fast_and_deterministic() -> None:
    start = time.perf_counter()
    tok = build_tokenizer(152064)
    assert time.perf_counter() - start < 2.0
    assert tok.vocab_size == len(tok) == 152064
    assert isinstance(tok.decode(list(range(152064))), str)
    again = build_tokenizer(152064)
    assert tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    assert tok.encode(TEXT) == again.encode(TEXT)


def test_tokenizer_round_trip_and_specials() -> None:
    tok = build_tokenizer(384)
    for text in (TEXT, "", " ", "\x00\x7f\u00a0", "a" * 50, "<|im_start|>user\nhi<|im_end|>"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" and")) == 1
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == 1
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert tok.encode("x<|im_end|>y") == [*tok.encode("x"), 4, *tok.encode("y")]


def test_chat_template(tmp_path: Path) -> None:
    tok = build_tokenizer(384)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Héllo 🙂"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHéllo 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids == tok.encode(expected)

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tok.chat_template
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.decode(loaded.encode(TEXT)) == TEXT
    assert len(loaded) == loaded.vocab_size == 384
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)


LONG_PROMPTS = [[(7 * i + 3 * j) % 380 + 4 for i in range(n)] for j, n in enumerate((24, 40))]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_config(variants: dict[str, Path], name: str) -> None:
    family, overrides = VARIANTS[name]
    path = variants[name]
    cfg = json.loads((path / "config.json").read_text())
    spelling = overrides.get("rope_spelling", RopeSpelling.PARAMETERS)
    rope = overrides.get("rope_parameters")
    if spelling is RopeSpelling.PARAMETERS:
        assert "rope_scaling" not in cfg and "rope_theta" not in cfg
        assert rope is None or cfg["rope_parameters"] == rope
    else:
        assert "rope_parameters" not in cfg and isinstance(cfg["rope_theta"], float)
        scaling = cfg["rope_scaling"]
        if family == "llama3" and rope is None:
            assert scaling is None
        if scaling is not None:
            assert scaling["factor"] == (rope or {}).get("factor", 8.0)
            key = "type" if spelling is RopeSpelling.LEGACY_TYPE else "rope_type"
            assert set(scaling) & {"type", "rope_type"} == {key}
    if name == "llama3.1-legacy-real":
        assert cfg["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        assert cfg["rope_theta"] == 500000.0 and cfg["max_position_embeddings"] == 131072
    if family == "mistral":
        assert cfg["sliding_window"] == overrides["sliding_window"] == 16
    if family == "qwen2":
        assert cfg["use_sliding_window"] is True and cfg["sliding_window"] == 16
        assert cfg["layer_types"] == ["full_attention", "sliding_attention"]
    if family == "ernie4_5":
        assert cfg["use_bias"] is True
        names = _tensor_names(path)
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert f"model.layers.0.{proj}.bias" in names


def test_variants_change_transformers_outputs(
    checkpoints: dict[str, Path], variants: dict[str, Path]
) -> None:
    """Same weights, other config: the sliding windows and the linear rope change what transformers
    generates (so a parity test on them can fail), and a legacy spelling reads as the new one."""
    for name, family in [("mistral-sliding16", "mistral"), ("qwen2-sliding16-top", "qwen2")]:
        assert hf_greedy(variants[name], LONG_PROMPTS, 8) != hf_greedy(
            checkpoints[family], LONG_PROMPTS, 8
        )
    linear = hf_greedy(variants["llama3-linear-rope"], LONG_PROMPTS, 8)
    assert linear != hf_greedy(checkpoints["llama3"], LONG_PROMPTS, 8)
    assert hf_greedy(variants["llama3-linear-legacy-type"], LONG_PROMPTS, 8) == linear
    for name, family in [
        ("llama3-legacy-rope", "llama3"),
        ("llama3.1-legacy-rope", "llama3.1"),
        ("llama3.1-legacy-type", "llama3.1"),
    ]:
        assert hf_greedy(variants[name], LONG_PROMPTS, 8) == hf_greedy(
            checkpoints[family], LONG_PROMPTS, 8
        )
