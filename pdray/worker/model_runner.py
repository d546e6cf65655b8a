"""Owns the device: the model, its paged KV cache, the attention backend and the sampler.

`execute(batch)` runs one forward over a flattened StepBatch and samples the rows that ask for it.
"""

from __future__ import annotations

import logging

import torch

from pdray.attention.base import AttentionMetadata, ForwardContext, forward_context
from pdray.attention.registry import get_attention_backend
from pdray.config import EngineConfig
from pdray.models.loader import build_model, load_model_config
from pdray.worker.batch import SampledToken, StepBatch
from pdray.worker.sampler import Sampler

logger = logging.getLogger(__name__)

_GiB = 1 << 30
_CPU_KV_CACHE_BYTES = 4 * _GiB
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _TORCH_DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in ("float16", "bfloat16"):
        return _TORCH_DTYPES[checkpoint_dtype]
    return torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        family, self.arch, _ = load_model_config(config.model)
        self.dtype = resolve_dtype(config.dtype, self.arch.torch_dtype, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(
            config.model, family, self.arch, self.dtype, self.device, config.seed
        )
        self.attention_layers = self.model.attention_layers()
        self.backend = get_attention_backend(
            config.attention_backend, self.device.type, self.device
        )
        self.sampler = Sampler(self.device)
        self.kv_cache: torch.Tensor | None = None
        self.graphs = None  # decode CUDA graphs, captured after the KV cache exists
        self.on_layer_kv_written = None  # set by KV transfer (prefill role)

    # -- KV cache -----------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * layer.num_kv_heads * layer.head_dim
        return per_token * self.config.block_size * self.dtype.itemsize

    def num_blocks_to_allocate(self, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return max(1, self.config.kv_cache_memory_bytes // self.block_bytes)
        blocks_per_seq = -(-max_model_len // self.config.block_size)
        if self.device.type == "cpu":
            budget = _CPU_KV_CACHE_BYTES // self.block_bytes
            return max(1, min(budget, self.config.max_num_seqs * blocks_per_seq))
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        reserve = _GiB + 4 * self.config.max_num_batched_tokens * self.arch.hidden_size * 4
        budget = int(total * self.config.gpu_memory_utilization) - used - reserve
        if budget < self.block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: {used / _GiB:.1f} GiB in use of "
                f"{total / _GiB:.1f} GiB; raise gpu_memory_utilization "
                f"({self.config.gpu_memory_utilization})"
            )
        return budget // self.block_bytes

    def allocate_kv_cache(self, num_blocks: int, max_model_len: int | None = None) -> None:
        """Allocate the cache; with max_model_len, also capture decode CUDA graphs (on CUDA)."""
        layer = self.attention_layers[0]
        shape = (
            len(self.attention_layers), 2, num_blocks, self.config.block_size,
            layer.num_kv_heads, layer.head_dim,
        )  # fmt: skip
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.kv_cache = self.kv_cache[i]
        logger.info("KV cache: %d blocks of %d tokens, %.2f GiB", num_blocks,
                    self.config.block_size, self.kv_cache.nbytes / _GiB)  # fmt: skip
        if max_model_len is not None:
            self._capture_graphs(max_model_len)

    def _capture_graphs(self, max_model_len: int) -> None:
        use = (
            self.device.type == "cuda"
            and not self.config.enforce_eager
            and getattr(self.backend, "supports_cuda_graphs", False)
        )
        if not use:
            return
        from pdray.worker.cuda_graph import DecodeCudaGraphs

        self.graphs = DecodeCudaGraphs(
            self.model, self.backend, max_num_seqs=self.config.max_num_seqs,
            max_model_len=max_model_len, block_size=self.config.block_size,
            hidden_size=self.arch.hidden_size, dtype=self.dtype, device=self.device,
        )  # fmt: skip
        self.graphs.capture()

    # -- one step ------------------------------------------------------------------------------------

    def _metadata(self, batch: StepBatch) -> AttentionMetadata:
        max_blocks = max(len(t) for t in batch.block_tables)
        tables = [t + [0] * (max_blocks - len(t)) for t in batch.block_tables]
        starts = [0]
        for n in batch.query_lens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            slot_mapping=self._to_device(batch.slot_mapping, torch.int64),
            query_start_loc=self._to_device(starts, torch.int32),
            seq_lens=self._to_device(batch.seq_lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32),
            query_lens_cpu=batch.query_lens,
            seq_lens_cpu=batch.seq_lens,
            max_query_len=max(batch.query_lens),
            max_seq_len=max(batch.seq_lens),
        )

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _to_device(self, values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=self._pin).to(
            self.device, non_blocking=True
        )

    def _eager_forward(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = self._to_device(batch.input_ids)
        positions = self._to_device(batch.positions)
        meta = self._metadata(batch)
        ctx = ForwardContext(meta, self.backend, self.on_layer_kv_written)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        ends = meta.query_start_loc[1:].long() - 1
        rows = ends[self._to_device(batch.sample_indices)] if batch.sample_indices else ends[:0]
        return hidden, rows

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> list[SampledToken]:
        if batch.finished_seq_ids:
            self.sampler.free(batch.finished_seq_ids)
        if not batch.input_ids:
            return []
        if (
            self.graphs is not None
            and self.on_layer_kv_written is None
            and self.graphs.can_run(batch)
        ):
            hidden = self.graphs.run(batch)  # [S, H]: in a decode step, row i is sequence i
            rows = self._to_device(batch.sample_indices)
        else:
            hidden, rows = self._eager_forward(batch)
        if not batch.sample_indices:
            return []
        logits = self.model.compute_logits(hidden[rows]).float()
        return self.sampler(logits, batch.sampling_rows)
