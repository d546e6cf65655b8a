"""Engine configuration: frozen, validated at construction, derived values as properties.

`EngineConfig` is what `LLM(...)` and the serving deployments build an engine from. It holds only
plain values (no torch objects) so it can cross process boundaries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class Role(str, enum.Enum):
    MIXED = "mixed"  # prefill and decode in this engine
    PREFILL = "prefill"  # computes a prompt's KV and first token, holds the blocks for transfer
    DECODE = "decode"  # admits requests whose KV arrives from a prefill engine


class Quantization(str, enum.Enum):
    """How the linear layers hold their weights (embeddings and the LM head stay full precision).

    None (the default) keeps the checkpoint's precision, except that an AWQ or GPTQ int4
    checkpoint is always loaded as int4.
    """

    WINT4 = "wint4"  # int4 weights with per-group scales and zeros, activations in `dtype`


PREFILL_STEP_TOKENS = 2048
PREFILL_FIRST_CHUNK_TOKENS = 8192
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
_TP_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    role: Role = Role.MIXED
    seed: int = 0
    tokenizer: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    # Tokens computed per step. None: 8192, or PREFILL_STEP_TOKENS for a prefill engine, whose
    # requests all end at their first token: a prompt that waits behind a larger batch waits for
    # all of it, while above ~2k tokens a step is near the device's matmul rate anyway
    # (docs/performance.md, "Prefill scheduling for TTFT").
    max_num_batched_tokens: int | None = None
    # Tokens a step may give the first sequence it schedules, where that is more than
    # max_num_batched_tokens: a prompt up to this long is computed in one step rather than cut
    # into chunks, and other prompts join a step only within max_num_batched_tokens. None:
    # max_num_batched_tokens, or PREFILL_FIRST_CHUNK_TOKENS for a prefill engine whose
    # max_num_batched_tokens is left to its default.
    first_chunk_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # KV cache size: an explicit block count wins; otherwise a byte budget (CPU default 4 GiB).
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    # Collectives of a tensor-parallel group: "auto" = NCCL on GPU, gloo on CPU. "gloo" on GPU
    # lets ranks share one GPU (NCCL refuses that), without CUDA graphs: for tests, not speed.
    tensor_parallel_backend: str = "auto"
    enforce_eager: bool = False
    # "wint4": full-precision checkpoints are quantized to int4 at load (round to nearest, per
    # group of 128 input features, else 64 or 32; docs/quantization.md)
    quantization: Quantization | None = None
    # With int4 linear layers (wint4 or an AWQ/GPTQ checkpoint): the LM head too, round to
    # nearest at load (an untied head's full-precision weight is freed; a tied one stays the
    # embedding's). Off by default: the head is the layer most sensitive to rounding.
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", _as_role(self.role))
        object.__setattr__(self, "quantization", _as_quantization(self.quantization))
        prefill_default = self.role is Role.PREFILL and self.max_num_batched_tokens is None
        if self.max_num_batched_tokens is None:
            default = PREFILL_STEP_TOKENS if self.role is Role.PREFILL else 8192
            object.__setattr__(self, "max_num_batched_tokens", default)
        if self.first_chunk_tokens is None:  # an explicit step budget caps every step
            first = PREFILL_FIRST_CHUNK_TOKENS if prefill_default else 0
            object.__setattr__(self, "first_chunk_tokens", max(first, self.max_num_batched_tokens))
        dtype = str(self.dtype).removeprefix("torch.")
        object.__setattr__(self, "dtype", {"half": "float16", "float": "float32"}.get(dtype, dtype))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"engine argument `{name}` {why}, got {getattr(self, name)!r}")

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "must be a local model directory or 'dummy:<preset>'")
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"must be one of {_DTYPES}")
        if self.device not in _DEVICES and not str(self.device).startswith("cuda:"):
            raise bad("device", f"must be one of {_DEVICES} or 'cuda:N'")
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "first_chunk_tokens",
            "block_size",
            "tensor_parallel_size",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.tensor_parallel_backend not in _TP_BACKENDS:
            raise bad("tensor_parallel_backend", f"must be one of {_TP_BACKENDS}")
        if self.block_size & (self.block_size - 1):
            raise bad("block_size", "must be a power of two")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise bad("max_model_len", "must be an integer >= 2 or None (the model's own)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise bad("num_kv_blocks", "must be a positive integer or None")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise bad("kv_cache_memory_bytes", "must be a positive integer or None")
        if not isinstance(self.quantize_lm_head, bool):
            raise bad("quantize_lm_head", "must be true or false")

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step can compute."""
        return max(self.max_num_batched_tokens, self.first_chunk_tokens)

    def replace(self, **changes) -> EngineConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {sorted(unknown)}")
        values.update(changes)
        return EngineConfig(**values)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(model=model, **kwargs)


def _as_role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        choices = [r.value for r in Role]
        raise ValueError(f"engine argument `role` must be one of {choices}, got {role!r}") from None


def _as_quantization(quantization: Quantization | str | None) -> Quantization | None:
    if quantization is None or isinstance(quantization, Quantization):
        return quantization
    try:
        return Quantization(quantization)
    except ValueError:
        choices = [None] + [q.value for q in Quantization]
        raise ValueError(
            f"engine argument `quantization` must be one of {choices}, got {quantization!r}"
        ) from None
