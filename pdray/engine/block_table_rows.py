"""Which row of the model runner's persistent block tables each running sequence has, and what
changed in those rows since the previous step. No torch.

The runner keeps the running sequences' block tables on its device (pdray/worker/block_tables.py);
a step's batch carries each sequence's row and only the changes. Row lifecycle:

  free -> assigned: the first step that schedules the sequence clears the row and writes its
          whole block table
       -> kept: later steps write only the block ids appended since (usually none)
       -> free: the sequence finished or was preempted (`free`); a row whose sequence left the
          running queue some other way (held for a KV transfer, aborted) is taken back when a new
          sequence needs a row and none is free.

A block table changes only by appends (BlockManager.grow / match_prefix) or by being replaced
with a new list (BlockManager.free, then a new allocation): a sequence whose table is another list
object, or shorter than what was sent, gets its whole row written again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pdray.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class _Row:
    index: int
    seq: Sequence
    table: list[int]  # the block_table list object whose first num_sent ids the runner holds
    num_sent: int = 0


class BlockTableRows:
    def __init__(self, num_rows: int, max_blocks: int):
        self.num_rows = num_rows
        self.max_blocks = max_blocks
        self._free = list(range(num_rows - 1, -1, -1))  # pop(): the last freed, at first row 0
        self._rows: dict[str, _Row] = {}

    @property
    def num_free_rows(self) -> int:
        return len(self._free)

    def row_of(self, seq: Sequence, clears: list[int], writes: list[int]) -> int:
        """seq's row; appends to clears and writes (flat row, column, block id) what the runner's
        copy of the row lacks."""
        entry = self._rows.get(seq.seq_id)
        table = seq.block_table
        if entry is None or entry.seq is not seq:  # new, or another sequence with its id
            index = self._take() if entry is None else entry.index
            entry = self._rows[seq.seq_id] = _Row(index, seq, table)
            clears.append(index)
        elif entry.table is not table or len(table) < entry.num_sent:
            entry.table, entry.num_sent = table, 0
            clears.append(entry.index)
        num_blocks = len(table)
        if num_blocks > entry.num_sent:
            if num_blocks > self.max_blocks:
                raise ValueError(
                    f"{seq.seq_id}: {num_blocks} KV blocks, more than a row holds ({self.max_blocks})"
                )
            index = entry.index
            for column in range(entry.num_sent, num_blocks):
                writes += (index, column, table[column])
            entry.num_sent = num_blocks
        return entry.index

    def free(self, seq_ids: Iterable[str]) -> None:
        """Give back the rows of these sequences (unknown ids are ignored)."""
        for seq_id in seq_ids:
            entry = self._rows.pop(seq_id, None)
            if entry is not None:
                self._free.append(entry.index)

    def _take(self) -> int:
        if not self._free:
            self.free(
                [s for s, e in self._rows.items() if e.seq.status is not SequenceStatus.RUNNING]
            )
        if not self._free:
            raise RuntimeError(
                f"more than {self.num_rows} running sequences: no block-table row is free"
            )
        return self._free.pop()
