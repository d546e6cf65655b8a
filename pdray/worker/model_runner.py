"""Owns the device: the model, its paged KV cache, the attention backend and the sampler.

`execute(batch)` runs one forward over a flattened StepBatch and samples the rows that ask for it;
`execute_step(batch)` also returns the scores of the prompt positions the batch names.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from pdray.attention.base import AttentionMetadata, ForwardContext, forward_context
from pdray.attention.registry import get_attention_backend
from pdray.config import EngineConfig
from pdray.models.loader import build_model, load_model_config
from pdray.worker.batch import PromptLogprobs, SampledToken, SamplingRow, StepBatch, StepOutput
from pdray.worker.block_tables import DeviceBlockTables
from pdray.worker.parallel import bound, current
from pdray.worker.prompt_logprobs import score_prompts
from pdray.worker.sampler import Sampler

logger = logging.getLogger(__name__)

_GiB = 1 << 30
_CPU_KV_CACHE_BYTES = 4 * _GiB
_NON_TORCH_BYTES = _GiB  # CUDA context, library workspaces, CUDA-graph pool: not in torch's stats
_FREE_MARGIN_BYTES = _GiB // 2
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}


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
        family, self.arch, _ = load_model_config(config.model)
        self.tp = current()  # a follower rank is built inside its group's binding
        self.tp_group = None  # rank 0 of a tensor-parallel engine drives the other ranks
        self._owned: dict = {"graphs": None}  # shared with the finalizer (it never holds self)
        if config.tensor_parallel_size > 1 and self.tp.size == 1:
            from pdray.worker.tp_group import TensorParallelGroup, check_shardable

            check_shardable(self.arch, config.tensor_parallel_size)
            self.tp_group = TensorParallelGroup(config)
            self.tp = self.tp_group.tp
            # dropped without close() (a notebook's second LLM), or at interpreter exit: the
            # followers stop; the finalizer holds the group, not the runner
            self._finalizer = weakref.finalize(self, _close_group, self._owned, self.tp_group)
        try:
            with bound(self.tp):
                self._build(config, family)
            if self.tp_group is not None:
                self.tp_group.wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def graphs(self):
        """The decode CUDA graphs (None before capture, on CPU, or eager)."""
        return self._owned["graphs"]

    @graphs.setter
    def graphs(self, graphs) -> None:
        self._owned["graphs"] = graphs

    def _build(self, config: EngineConfig, family: str) -> None:
        self.rank = self.tp.rank
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and config.tensor_parallel_size > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())  # set for its rank
        elif self.device.type == "cuda":
            # "cuda:N": kernels, CUDA graphs and streams of this engine all go to GPU N
            index = self.device.index
            self.device = torch.device(
                "cuda", torch.cuda.current_device() if index is None else index
            )
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, self.arch.torch_dtype, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(
            config.model, family, self.arch, self.dtype, self.device, config.seed,
            quantization=config.quantization, quantize_lm_head=config.quantize_lm_head,
        )  # fmt: skip
        self.attention_layers = self.model.attention_layers()
        self.backend = get_attention_backend(
            config.attention_backend, self.device.type, self.device
        )
        self.sampler = Sampler(self.device)
        self.kv_cache: torch.Tensor | None = None
        # The running sequences' block tables, kept across steps (built with max_model_len)
        self.block_tables: DeviceBlockTables | None = None
        self.graphs = None  # decode CUDA graphs, captured after the KV cache exists
        self.on_layer_kv_written = None  # set by KV transfer (prefill role)

    # -- KV cache -----------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * layer.num_kv_heads * layer.head_dim
        return per_token * self.config.block_size * self.dtype.itemsize

    @property
    def kv_layout(self):
        """This rank's KV cache layout, with the KV heads it holds (for KV transfer)."""
        from pdray.kv_transfer.base import KVLayout

        return KVLayout.of(
            self.kv_cache, tp_rank=self.rank, tp_size=self.config.tensor_parallel_size,
            total_kv_heads=self.arch.num_kv_heads,
        )  # fmt: skip

    def num_blocks_to_allocate(self, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return max(1, self.config.kv_cache_memory_bytes // self.block_bytes)
        blocks_per_seq = -(-max_model_len // self.config.block_size)
        if self.device.type == "cpu":
            budget = _CPU_KV_CACHE_BYTES // self.block_bytes
            return max(1, min(budget, self.config.max_num_seqs * blocks_per_seq))
        return self._gpu_kv_budget(max_model_len) // self.block_bytes

    def _gpu_kv_budget(self, max_model_len: int) -> int:
        """Bytes left for the KV cache of this process's share of the GPU.

        share = total x gpu_memory_utilization (so instances can split one GPU); from it go the
        peak this process's allocator reached running the largest step (weights + activations,
        measured by `profile_peak_bytes`) and a fixed allowance for what the allocator does not
        see (CUDA context, cuBLAS/Triton workspaces, the decode CUDA graphs' pool). The cache also
        never takes more than is free now, minus a margin, when other processes hold memory.
        """
        free, total = torch.cuda.mem_get_info(self.device)
        peak = self.profile_peak_bytes(max_model_len)
        share = int(total * self.config.gpu_memory_utilization)
        budget = min(share - peak - _NON_TORCH_BYTES, free - _FREE_MARGIN_BYTES)
        logger.info(
            "GPU memory: share %.1f GiB of %.1f GiB; peak without KV %.2f GiB; free %.1f GiB; "
            "KV cache %.2f GiB", share / _GiB, total / _GiB, peak / _GiB, free / _GiB,
            max(budget, 0) / _GiB,
        )  # fmt: skip
        if budget < self.block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: this instance's share is {share / _GiB:.1f} "
                f"GiB (gpu_memory_utilization {self.config.gpu_memory_utilization} of "
                f"{total / _GiB:.1f} GiB), its peak without the cache {peak / _GiB:.1f} GiB, "
                f"{free / _GiB:.1f} GiB free; raise gpu_memory_utilization or lower "
                "max_num_batched_tokens"
            )
        return budget

    @torch.inference_mode()
    def profile_peak_bytes(self, max_model_len: int) -> int:
        """Peak bytes the allocator holds running `largest_step` (LM head and sampler included)
        with a scratch KV cache just large enough for it, which is not counted."""
        batch, num_blocks = self.largest_step(max_model_len)
        self._bind_kv_cache(num_blocks)
        scratch = self.kv_cache.nbytes
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(batch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_reserved(self.device) - scratch
        self.sampler.free(row.seq_id for row in batch.sampling_rows)
        self._bind_kv_cache(None)
        torch.cuda.empty_cache()
        return peak

    def largest_step(self, max_model_len: int) -> tuple[StepBatch, int]:
        """The step with the most activations this engine can run: max_step_tokens fresh tokens
        over up to max_num_seqs sequences, each sampling with top-k; and the number of KV blocks
        it needs."""
        cfg = self.config
        num_tokens = min(cfg.max_step_tokens, cfg.max_num_seqs * max_model_len)
        num_seqs = min(cfg.max_num_seqs, num_tokens)
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        block_size = cfg.block_size
        tables, slots, positions, num_blocks = [], [], [], 0
        for n in lens:
            count = -(-n // block_size)
            tables.append(list(range(num_blocks, num_blocks + count)))
            slots += [num_blocks * block_size + j for j in range(n)]
            positions += list(range(n))
            num_blocks += count
        batch = StepBatch(
            input_ids=[0] * num_tokens, positions=positions, slot_mapping=slots, query_lens=lens,
            seq_lens=lens, block_tables=tables, sample_indices=list(range(num_seqs)),
            sampling_rows=[SamplingRow(seq_id=f"profile-{i}", top_k=50) for i in range(num_seqs)],
        )  # fmt: skip
        return batch, num_blocks

    def allocate_kv_cache(self, num_blocks: int, max_model_len: int | None = None) -> None:
        """Allocate the cache; with max_model_len, also the persistent block tables that the
        engine's batches update, and the decode CUDA graphs (on CUDA)."""
        self._bind_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens, %.2f GiB", num_blocks,
                    self.config.block_size, self.kv_cache.nbytes / _GiB)  # fmt: skip
        if max_model_len is not None:
            self._prepare_steps(max_model_len)

    def _bind_kv_cache(self, num_blocks: int | None) -> None:
        """A zeroed cache of num_blocks, bound to every attention layer (None: unbind)."""
        if self.tp_group is not None:
            self.tp_group.broadcast("_bind_kv_cache", num_blocks)
        self.kv_cache = None
        if num_blocks is not None:
            layer = self.attention_layers[0]
            shape = (
                len(self.attention_layers), 2, num_blocks, self.config.block_size,
                layer.num_kv_heads, layer.head_dim,
            )  # fmt: skip
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.kv_cache = None if self.kv_cache is None else self.kv_cache[i]

    def _prepare_steps(self, max_model_len: int) -> None:
        """On every rank: block tables of max_num_seqs rows that cover max_model_len tokens,
        then the decode CUDA graphs, which read their rows."""
        if self.tp_group is not None:
            self.tp_group.broadcast("_prepare_steps", max_model_len)
        self.build_block_tables(max_model_len)
        self._capture_graphs(max_model_len)

    def build_block_tables(self, max_model_len: int) -> None:
        """This rank's persistent block tables: max_num_seqs rows covering max_model_len."""
        max_blocks = -(-max_model_len // self.config.block_size)
        self.block_tables = DeviceBlockTables(self.config.max_num_seqs, max_blocks, self.device)

    def _capture_graphs(self, max_model_len: int) -> None:
        gloo_on_gpu = self.config.tensor_parallel_size > 1 and (
            self.config.tensor_parallel_backend == "gloo"  # its collectives cannot be captured
        )
        use = (
            self.device.type == "cuda"
            and not self.config.enforce_eager
            and not gloo_on_gpu
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
        with bound(self.tp):
            self.graphs.capture()

    # -- one step ------------------------------------------------------------------------------------

    def _metadata(self, batch: StepBatch) -> AttentionMetadata:
        starts = [0]
        for n in batch.query_lens:
            starts.append(starts[-1] + n)
        max_seq_len = max(batch.seq_lens)
        return AttentionMetadata(
            slot_mapping=self._to_device(batch.slot_mapping, torch.int64),
            query_start_loc=self._to_device(starts, torch.int32),
            seq_lens=self._to_device(batch.seq_lens, torch.int32),
            block_tables=self._block_tables(batch, max_seq_len),
            query_lens_cpu=batch.query_lens,
            seq_lens_cpu=batch.seq_lens,
            max_query_len=max(batch.query_lens),
            max_seq_len=max_seq_len,
        )

    def _block_tables(self, batch: StepBatch, max_seq_len: int) -> torch.Tensor:
        """[S, max_blocks] int32: the batch's own tables padded with 0, or its rows of the
        persistent tables, as many columns as the longest context covers."""
        if not batch.table_rows:
            max_blocks = max(len(t) for t in batch.block_tables)
            tables = [t + [0] * (max_blocks - len(t)) for t in batch.block_tables]
            return self._to_device(tables, torch.int32)
        num_blocks = -(-max_seq_len // self.config.block_size)
        return self._persistent_tables().gather(self._to_device(batch.table_rows), num_blocks)

    def _persistent_tables(self) -> DeviceBlockTables:
        if self.block_tables is None:
            raise RuntimeError(
                "a batch names rows of the persistent block tables, but this runner has none: "
                "allocate_kv_cache(num_blocks, max_model_len) builds them"
            )
        return self.block_tables

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _to_device(self, values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        # numpy turns a list into an array several times faster than torch.tensor does
        host = torch.from_numpy(np.asarray(values, dtype=_NUMPY_DTYPES[dtype]))
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

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

    def execute(self, batch: StepBatch) -> list[SampledToken]:
        """Run one step; the sampled tokens (rank 0), one per sampling row."""
        return self.execute_step(batch).sampled

    @torch.inference_mode()
    def execute_step(self, batch: StepBatch) -> StepOutput:
        """Run one step; its sampled tokens and the scores of its prompt rows (rank 0)."""
        if self.tp_group is None:
            return self._execute(batch)
        self.tp_group.broadcast("execute", batch.for_followers())
        try:
            out = self._execute(batch)
        except Exception as e:  # a collective broke: name the rank that went away, if one did
            self.tp_group.explain(e)
            raise
        self.tp_group.check()  # a rank lost mid-step (NCCL aborted): its tokens are not results
        return out

    def _execute(self, batch: StepBatch) -> StepOutput:
        if batch.finished_seq_ids:
            self.sampler.free(batch.finished_seq_ids)
        if batch.table_clears or batch.table_writes:
            self._persistent_tables().update(batch.table_clears, batch.table_writes)
        if not batch.input_ids:
            return StepOutput()
        scored = []
        argmax = None  # the logits' argmax per sampling row, where the decode graph computed it
        with bound(self.tp):
            if (
                self.graphs is not None
                and self.on_layer_kv_written is None
                and not batch.prompt_logprob_rows
                and self.graphs.can_run(batch)
            ):
                tables = self._persistent_tables() if batch.table_rows else None
                logits = self.graphs.run(batch, tables)  # [S, V]: row i is sequence i
                argmax = self.graphs.argmax[: logits.shape[0]]
                if batch.sample_indices != list(range(len(batch.query_lens))):
                    index = self._to_device(batch.sample_indices)
                    logits, argmax = logits[index], argmax[index]
            else:
                hidden, rows = self._eager_forward(batch)
                if batch.prompt_logprob_rows:
                    scored = self._score_prompts(hidden, batch)
                if not batch.sample_indices:
                    return StepOutput([], scored)
                logits = self.model.compute_logits(hidden[rows])
        if self.rank != 0:  # the LM head's all-gather is done; rank 0 samples
            return StepOutput()
        return StepOutput(self.sampler(logits, batch.sampling_rows, argmax=argmax), scored)

    def _score_prompts(self, hidden: torch.Tensor, batch: StepBatch) -> list[PromptLogprobs]:
        # The LM head over at most 2 x max_num_seqs prompt positions at a time: their logits and
        # float32 logprobs (~11 bytes per vocabulary entry) stay under what the profiled step's
        # sampler holds for max_num_seqs rows (a float32 copy, a sort with int64 ids, masks).
        return score_prompts(
            self.model.compute_logits, hidden, batch.prompt_logprob_rows,
            max_rows_per_call=2 * self.config.max_num_seqs, keep=self.rank == 0,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel engine and free this rank's CUDA graphs, KV
        cache and weights. Final: the runner cannot run afterwards."""
        self.graphs = None  # before the communicator goes: the graphs hold its kernels
        group, self.tp_group = self.tp_group, None
        if group is not None:
            group.close()
        for attn in getattr(self, "attention_layers", []):
            attn.kv_cache = None
        self.kv_cache = self.model = None
        if getattr(self, "device", None) is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()


def _close_group(owned: dict, group) -> None:
    """A tensor-parallel runner's finalizer: free its CUDA graphs, whose NCCL kernels must not
    outlive the communicator, then stop the group."""
    owned.clear()
    group.close()
