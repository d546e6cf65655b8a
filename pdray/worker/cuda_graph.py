"""Decode steps replayed from CUDA graphs, one graph per batch size of a ladder.

Lifecycle: `capture()` once, after the KV cache is bound to the attention layers; then per decode
step `can_run(batch)` and `run(batch, tables) -> logits [S, V]` (the LM head and the argmax of
its logits run inside the graph: `argmax[:S]`, for greedy steps, which copy only those ids to the
host). Graphs are captured largest first into one memory pool and write shared output buffers.
A batch of S sequences replays the smallest graph of at least S rows; the rows past S are padding
(token 0, slot -1 so no KV is written, context length 0 so attention reads nothing).

Every input lives in a static device buffer (`DecodeInputs`, which runs on CPU too, for tests):
per step, token ids, positions, slots, context lengths and block-table rows go to the device in
one asynchronous copy from a pinned host buffer, and the block tables are gathered on the device
from the runner's persistent tables (or, for a batch that carries its own tables, copied from the
host): no host-device sync inside a step.

Prefill and mixed steps stay eager. The backend must launch decode from device tensors only
(`supports_cuda_graphs`); the split count it derives from `max_seq_len` is fixed at capture
(`max_model_len`), so replays of one graph launch the same kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pdray.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    forward_context,
)
from pdray.worker.batch import StepBatch
from pdray.worker.block_tables import DeviceBlockTables


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


# What a padding row of the staged inputs holds: token 0, position 0, slot -1, length 0, row 0.
_PAD_COLUMN = np.array([0, 0, -1, 0, 0], dtype=np.int64)[:, None]


class DecodeInputs:
    """The decode graphs' static inputs, and their staging from one step's batch."""

    def __init__(
        self, *, max_batch_size: int, max_model_len: int, block_size: int, device: torch.device
    ):
        self.max_blocks = -(-max_model_len // block_size)
        on_cuda = torch.device(device).type == "cuda"
        # ids | positions | slots | context lengths | table rows, [5, max_batch_size] int64
        self._host = torch.zeros((5, max_batch_size), dtype=torch.int64, pin_memory=on_cuda)
        self._host_np = self._host.numpy()
        self.staged = torch.zeros((5, max_batch_size), dtype=torch.int64, device=device)
        self.input_ids = self.staged[0]  # [max_batch_size] views of that one buffer
        self.positions = self.staged[1]
        self.slot_mapping = self.staged[2]
        self.rows = self.staged[4]
        self.slot_mapping.fill_(-1)
        self.seq_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            (max_batch_size, self.max_blocks), dtype=torch.int32, device=device
        )
        self.query_start_loc = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)
        self._host_tables: torch.Tensor | None = None  # pinned, for batches with their own tables
        self._on_cuda = on_cuda
        self._copied = torch.cuda.Event() if on_cuda else None

    def stage(self, batch: StepBatch, bs: int, tables: DeviceBlockTables | None = None) -> None:
        """Fill rows [0, bs) from batch's S <= bs sequences (padding after them); the block
        tables from `tables` (the batch's table_rows) or, without it, from batch.block_tables."""
        n = len(batch.query_lens)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the host buffer
        host = self._host_np  # numpy fills it from lists several times faster than torch
        host[0, :n] = batch.input_ids
        host[1, :n] = batch.positions
        host[2, :n] = batch.slot_mapping
        host[3, :n] = batch.seq_lens
        host[4, :n] = batch.table_rows if tables is not None else 0
        host[:, n:bs] = _PAD_COLUMN
        self.staged.copy_(self._host, non_blocking=True)
        self.seq_lens[:bs].copy_(self.staged[3, :bs])
        if tables is not None:
            if tables.max_blocks != self.max_blocks:
                raise ValueError(
                    f"block tables of {tables.max_blocks} columns for graphs of {self.max_blocks}"
                )
            torch.index_select(tables.tables, 0, self.rows[:n], out=self.block_tables[:n])
        else:
            self._stage_own_tables(batch.block_tables)
        if self._copied is not None:
            self._copied.record()

    def _stage_own_tables(self, block_tables: list[list[int]]) -> None:
        n, width = len(block_tables), max(len(t) for t in block_tables)
        if self._host_tables is None:
            self._host_tables = torch.zeros(
                self.block_tables.shape, dtype=torch.int32, pin_memory=self._on_cuda
            )
        host = self._host_tables.numpy()
        for i, table in enumerate(block_tables):
            host[i, : len(table)] = table
            host[i, len(table) : width] = 0
        self.block_tables[:n, :width].copy_(self._host_tables[:n, :width], non_blocking=True)

    def metadata(self, bs: int, max_model_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[max_model_len] * bs,
            max_query_len=1,
            max_seq_len=max_model_len,
        )


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
        self.inputs = DecodeInputs(
            max_batch_size=max_bs, max_model_len=max_model_len, block_size=block_size,
            device=device,
        )  # fmt: skip
        self.hidden = torch.zeros((max_bs, hidden_size), dtype=dtype, device=device)
        self.logits: torch.Tensor | None = None  # [max_bs, V], allocated by the first capture
        self.argmax = torch.zeros(max_bs, dtype=torch.int64, device=device)  # of each logits row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _forward(self, bs: int) -> None:
        inputs = self.inputs
        meta = inputs.metadata(bs, self.max_model_len)
        with forward_context(ForwardContext(meta, self.backend)):
            self.hidden[:bs] = self.model(inputs.input_ids[:bs], inputs.positions[:bs])
            logits = self.model.compute_logits(self.hidden[:bs])
        if self.logits is None:
            self.logits = torch.empty(
                (bs, logits.shape[1]), dtype=logits.dtype, device=logits.device
            )
        self.logits[:bs] = logits
        torch.argmax(self.logits[:bs], dim=-1, out=self.argmax[:bs])

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

    def padded_size(self, num_seqs: int) -> int:
        """Rows of the graph that replays a step of num_seqs sequences."""
        return next(b for b in self.batch_sizes if b >= num_seqs)

    @torch.inference_mode()
    def run(self, batch: StepBatch, tables: DeviceBlockTables | None = None) -> torch.Tensor:
        """Replay the decode step of `batch`, whose block tables are its rows of `tables` (or,
        without them, its own); returns its logits [S, V] (a view; their argmax is argmax[:S])."""
        n = len(batch.query_lens)
        bs = self.padded_size(n)
        self.inputs.stage(batch, bs, tables)
        self.graphs[bs].replay()
        return self.logits[:n]
