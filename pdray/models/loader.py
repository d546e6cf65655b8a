"""Build a model from a local Hugging Face directory or a `dummy:<preset>`.

Checkpoint tensors stream file by file (single safetensors, or shards listed by an index) into the
parameters' own weight loaders, which take only this rank's slice. Every parameter must be loaded
exactly once; anything missing, misshapen or unreadable is an error that names it.

Weight-only int4 (pdray/quantization): an AWQ/GPTQ checkpoint's int4 tensors are converted to
pdray's layout as they stream; with `quantization="wint4"` the full-precision weights (or the
dummy ones) load as usual and each linear layer is quantized once everything is loaded.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pdray.config import Quantization
from pdray.layers.linear import quantize_linear_layers
from pdray.models.config import ModelArch, read_config_json
from pdray.models.registry import Family, resolve_architecture
from pdray.quantization.checkpoint import Int4CheckpointReader
from pdray.quantization.spec import Int4Source, Int4Spec, resolve_int4_spec

logger = logging.getLogger(__name__)

DUMMY_PREFIX = "dummy:"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model_config(model: str) -> tuple[Family, ModelArch, dict]:
    """Family, arch and raw config.json for a directory or a dummy preset."""
    if model.startswith(DUMMY_PREFIX):
        from pdray.models.dummy import preset_config

        cfg = preset_config(model.removeprefix(DUMMY_PREFIX))
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(
                f"model {model!r} is neither a local directory nor 'dummy:<preset>' "
                "(pdray loads local Hugging Face directories; it downloads nothing)"
            )
        cfg = read_config_json(path)
    family, arch = resolve_architecture(cfg)
    return family, arch, cfg


def build_model(
    model: str,
    family: Family,
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    quantization: Quantization | None = None,
    quantize_lm_head: bool = False,
) -> nn.Module:
    """The model with its weights; `quantization` is the engine argument (an AWQ/GPTQ
    checkpoint is int4 whatever it says); `quantize_lm_head` rounds the LM head to int4 too."""
    int4 = resolve_int4_spec(arch.int4_checkpoint, quantization)
    if quantize_lm_head and int4 is None:
        raise ValueError(
            "quantize_lm_head quantizes the LM head of an int4 model: set quantization='wint4' "
            "(or load an AWQ/GPTQ int4 checkpoint), or leave quantize_lm_head off"
        )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = family.model_class(arch, int4)
    finally:
        torch.set_default_dtype(default_dtype)
    if model.startswith(DUMMY_PREFIX):
        init_dummy_weights(module, seed)
    else:
        load_weights(module, Path(model))
    quantize_linear_layers(module)
    if quantize_lm_head:  # round to nearest, also for a checkpoint whose layers came in int4
        head_spec = int4 if int4.quantize_at_load else Int4Spec(Int4Source.RTN)
        module.lm_head.quantize(head_spec, tied=arch.tie_word_embeddings)
    return module.eval()


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: corrupt safetensors index ({e!r})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: shard(s) listed in the index are missing: {missing}"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no *.safetensors weights (only safetensors is supported)"
        )
    return files


def iterate_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable or corrupt safetensors file ({e})") from None


def load_weights(module: nn.Module, model_dir: Path) -> None:
    params = dict(module.named_parameters())
    packed = getattr(module, "packed_modules", {})
    int4 = module.arch.int4_checkpoint
    reader = Int4CheckpointReader(int4) if int4 is not None else None
    loaded: set[str] = set()
    for name, tensor in iterate_tensors(checkpoint_files(model_dir)):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if reader is not None:
            try:
                converted = reader.convert_tensor(name, tensor)
            except ValueError as e:
                raise ValueError(f"{model_dir}: tensor {name!r}: {e}") from None
            if converted is None:
                continue
            name, tensor = converted
        target, shard_id = _map_name(name, packed)
        param = params.get(target)
        if param is None:
            if name == "lm_head.weight" and module.arch.tie_word_embeddings:
                continue
            if reader is not None and name.endswith(".bias") and not tensor.any():
                continue  # AutoGPTQ may save zero biases for layers that have none
            raise ValueError(
                f"{model_dir}: checkpoint tensor {name!r} matches no model parameter"
                + _int4_hint(name, int4)
            )
        try:
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor.to(param.dtype), shard_id)
        except ValueError as e:
            raise ValueError(f"{model_dir}: tensor {name!r}: {e}") from None
        loaded.add(f"{target}:{shard_id}")
    _check_complete(module, params, packed, loaded, model_dir)


def _int4_hint(name: str, int4) -> str:
    if int4 is None or not name.endswith(".weight"):
        return ""
    return (
        f" (the {int4.source.value} checkpoint's quantization_config quantizes its linear "
        "layers; a full-precision linear weight, from modules_to_not_convert, is not supported)"
    )


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def _map_name(name: str, packed: dict) -> tuple[str, object]:
    for ckpt_part, (our_part, shard_id) in packed.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{our_part}."), shard_id
    return name, None


def _check_complete(module, params, packed, loaded, model_dir) -> None:
    shards_of: dict[str, list] = {}
    for our_part, shard_id in packed.values():
        shards_of.setdefault(our_part, []).append(shard_id)
    missing = []
    for name in params:
        part = name.split(".")[-2] if "." in name else name
        needed = shards_of.get(part, [None])
        missing += [f"{name}:{s}" for s in needed if f"{name}:{s}" not in loaded]
    if missing:
        shown = ", ".join(m.removesuffix(":None") for m in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"{model_dir}: checkpoint is missing weights: {shown}{more}")


def init_dummy_weights(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights in place, the same whatever the tensor-parallel size: each checkpoint
    tensor a layer would load (`full_shards`) is drawn unsharded from a generator seeded by the
    seed and its name, on the parameter's device (fast for 8B shapes), and handed to the layer's
    weight loader, which keeps this rank's slice. Norm weights are 1, biases 0."""
    for prefix, layer in module.named_modules():
        for name, param in layer.named_parameters(recurse=False):
            full_name = f"{prefix}.{name}" if prefix else name
            if full_name.endswith("norm.weight"):
                param.data.fill_(1.0)
            elif name == "bias":
                param.data.zero_()
            elif hasattr(layer, "full_shards") and name == "weight":
                for shard_id, shape in layer.full_shards():
                    full = _normal(shape, param, seed, f"{full_name}:{shard_id}", std)
                    param.weight_loader(param, full, shard_id)
            else:
                param.data.copy_(_normal(param.shape, param, seed, full_name, std))


def _normal(shape, like: torch.Tensor, seed: int, name: str, std: float) -> torch.Tensor:
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    return out.normal_(0.0, std, generator=generator)
