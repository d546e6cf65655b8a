"""Decode steps replayed from CUDA graphs, one graph per batch size of a ladder.

Lifecycle: `capture()` once, after the KV cache is bound to the attention layers; then per decode
step `can_run(batch)` and `run(batch) -> logits [S, V]` (the LM head runs inside the graph). Graphs are captured largest first into one
memory pool and write shared output buffers. A batch of S sequences replays the smallest graph
of at least S rows; the rows past S are padding (token 0, slot -1 so no KV is written, context
length 0 so attention reads nothing). Every input lives in a static device buffer that `run` fills
from pinned host buffers with asynchronous copies: no host-device sync inside a step.

Prefill and mixed steps stay eager. The backend must launch decode from device tensors only
(`supports_cuda_graphs`); the split count it derives from `max_seq_len` is fixed at capture
(`max_model_len`), so replays of one graph launch the same kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from pdray.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    forward_context,
)
from pdray.worker.batch import StepBatch


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


class DecodeCudaGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        batch_sizes: list[int] | None = None,
    ):
        if not getattr(backend, "supports_cuda_graphs", False):
            raise ValueError(f"attention backend {backend.name!r} cannot run in CUDA graphs")
        self.model = model
        self.backend = backend
        self.max_model_len = max_model_len
        self.batch_sizes = sorted(set(batch_sizes or batch_size_ladder(max_num_seqs)))
        max_bs = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        # Static device inputs: [max_bs] each, block tables [max_bs, max_blocks].
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_bs, self.max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros((max_bs, hidden_size), dtype=dtype, device=device)
        self.logits: torch.Tensor | None = None  # [max_bs, V], allocated by the first capture
        # Pinned staging: ids | positions | slots (int64), seq_lens and tables (int32).
        self._host_i64 = torch.zeros((3, max_bs), dtype=torch.int64, pin_memory=True)
        self._host_seq_lens = torch.zeros(max_bs, dtype=torch.int32, pin_memory=True)
        self._host_tables = torch.zeros(
            (max_bs, self.max_blocks), dtype=torch.int32, pin_memory=True
        )
        self._copied = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _forward(self, bs: int) -> None:
        with forward_context(ForwardContext(self._metadata(bs), self.backend)):
            self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            logits = self.model.compute_logits(self.hidden[:bs])
        if self.logits is None:
            self.logits = torch.empty(
                (bs, logits.shape[1]), dtype=logits.dtype, device=logits.device
            )
        self.logits[:bs] = logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size of the ladder (largest first, one pool)."""
        pool = None
        for bs in reversed(self.batch_sizes):
            self._forward(bs)  # warm-up: compiles kernels, creates library handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, batch: StepBatch) -> bool:
        """True for a decode-only step that fits the largest captured batch."""
        num_seqs = len(batch.query_lens)
        return (
            bool(self.graphs)
            and 0 < num_seqs <= self.batch_sizes[-1]
            and batch.num_tokens == num_seqs
            and max(batch.seq_lens) <= self.max_model_len
        )

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """Replay the decode step of `batch`; returns its logits [S, V] (a view)."""
        n = len(batch.query_lens)
        bs = next(b for b in self.batch_sizes if b >= n)
        width = max(len(t) for t in batch.block_tables)
        self._copied.synchronize()  # the previous step's copies have left the staging buffers
        host = self._host_i64
        host[:, n:bs] = 0
        host[2, n:bs] = -1
        host[0, :n] = torch.tensor(batch.input_ids, dtype=torch.int64)
        host[1, :n] = torch.tensor(batch.positions, dtype=torch.int64)
        host[2, :n] = torch.tensor(batch.slot_mapping, dtype=torch.int64)
        self._host_seq_lens[:n] = torch.tensor(batch.seq_lens, dtype=torch.int32)
        self._host_seq_lens[n:bs] = 0
        rows = [t + [0] * (width - len(t)) for t in batch.block_tables]
        self._host_tables[:n, :width] = torch.tensor(rows, dtype=torch.int32)
        self.input_ids[:bs].copy_(host[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(host[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(host[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(self._host_seq_lens[:bs], non_blocking=True)
        self.block_tables[:n, :width].copy_(self._host_tables[:n, :width], non_blocking=True)
        self._copied.record()
        self.graphs[bs].replay()
        return self.logits[:n]
