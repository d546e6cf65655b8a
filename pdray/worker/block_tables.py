"""Block tables of the running sequences, kept on the device across steps.

Lifecycle: built with the decode state, once the engine's max_model_len is known
(`ModelRunner.allocate_kv_cache`), as [rows, max_blocks] int32 zeros, one row per sequence the
engine may run at once. Before each step the runner applies the batch's changes (`update`: the
cleared rows become zeros, then each (row, column, block id) triple is written), sent to the
device in one small copy; the step then reads its sequences' rows (`gather`). Which row belongs
to which sequence, and what changed, is the engine's side (pdray/engine/block_table_rows.py).
"""

from __future__ import annotations

import numpy as np
import torch


class DeviceBlockTables:
    def __init__(self, num_rows: int, max_blocks: int, device: torch.device):
        self.device = device
        self.tables = torch.zeros((num_rows, max_blocks), dtype=torch.int32, device=device)

    @property
    def num_rows(self) -> int:
        return self.tables.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.tables.shape[1]

    def update(self, clears: list[int], writes: list[int]) -> None:
        """Zero the rows `clears`, then set tables[row, column] = block id for each triple of the
        flat `writes` (row, column, block id, row, ...)."""
        if not clears and not writes:
            return
        self._check(clears, writes)
        packed = torch.from_numpy(np.array(clears + writes, dtype=np.int64))
        if self.device.type == "cuda":
            # from pinned memory the copy is queued on the stream, not waited for
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        if clears:
            self.tables.index_fill_(0, packed[: len(clears)], 0)
        if writes:
            triples = packed[len(clears) :].view(-1, 3)
            values = triples[:, 2].to(torch.int32)
            self.tables.index_put_((triples[:, 0], triples[:, 1]), values)

    def _check(self, clears: list[int], writes: list[int]) -> None:
        # An index out of range would be a device-side assert on CUDA: refuse it here instead.
        if len(writes) % 3:
            raise ValueError(
                f"table_writes holds {len(writes)} values, not (row, column, block) triples"
            )
        rows = [*clears, *writes[0::3]]
        if rows and not 0 <= min(rows) <= max(rows) < self.num_rows:
            raise ValueError(f"block-table row out of range [0, {self.num_rows}): {rows}")
        columns = writes[1::3]
        if columns and not 0 <= min(columns) <= max(columns) < self.max_blocks:
            raise ValueError(
                f"block-table column out of range [0, {self.max_blocks}) (a sequence longer than "
                f"max_model_len?): {columns}"
            )

    def gather(self, rows: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """The first num_blocks columns of rows [S] (int64 on the device): [S, num_blocks]."""
        return self.tables[:, :num_blocks].index_select(0, rows)
