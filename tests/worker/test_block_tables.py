"""Persistent block tables: the rows the engine keeps up to date with small deltas equal tables
built afresh from the sequences' block lists, over random schedules (appends, prefix hits,
finishes, preemptions, sequences held for a transfer, reuse of rows and of sequence ids), and an
engine step reads the same tables and computes the same tokens either way."""

from __future__ import annotations

import random

import pytest
import torch

from pdray import LLM, SamplingParams
from pdray.engine.block_manager import BlockManager
from pdray.engine.block_table_rows import BlockTableRows
from pdray.engine.sequence import Sequence, SequenceStatus
from pdray.worker.batch import StepBatch
from pdray.worker.block_tables import DeviceBlockTables

BLOCK_SIZE = 4


def fresh_rows(tables: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


class RandomSchedule:
    """Sequences over a real BlockManager, moved between running, waiting (preempted), held and
    finished at random; `step()` schedules some running ones and syncs their rows."""

    def __init__(self, seed: int, num_rows: int = 6, max_blocks: int = 12, num_blocks: int = 40):
        self.rng = random.Random(seed)
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
        self.rows = BlockTableRows(num_rows, max_blocks)
        self.device_tables = DeviceBlockTables(num_rows, max_blocks, torch.device("cpu"))
        self.num_rows, self.max_blocks = num_rows, max_blocks
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.ended: list[Sequence] = []  # finished or held: their ids may come back
        self.next_id = 0
        self.counts = dict.fromkeys(("admit", "preempt", "finish", "hold", "reuse_id", "free"), 0)

    def _new_seq(self) -> Sequence:
        live = {s.seq_id for s in self.running + self.waiting + self.ended if not s.is_finished}
        finished = [s for s in self.ended if s.is_finished and s.seq_id not in live]
        if finished and self.rng.random() < 0.3:  # a new request under a finished one's id
            seq_id = self.rng.choice(finished).seq_id
            self.counts["reuse_id"] += 1
        else:
            seq_id, self.next_id = f"s{self.next_id}", self.next_id + 1
        # few distinct tokens, so prompts share prefixes and reuse cached blocks
        tokens = [self.rng.randrange(2) for _ in range(self.rng.randrange(1, 20))]
        return Sequence(seq_id, seq_id, 0, tokens, len(tokens), SamplingParams())

    def _admit(self, seq: Sequence) -> bool:
        if not seq.block_table:
            self.blocks.match_prefix(seq)
        if not self.blocks.grow(seq, len(seq)):
            self.blocks.free(seq)
            return False
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.counts["admit"] += 1
        return True

    def _leave(self, seq: Sequence, status: SequenceStatus, free_blocks: bool) -> None:
        self.running.remove(seq)
        seq.status = status
        if free_blocks:
            self.blocks.free(seq)
        if self.rng.random() < 0.5:  # the engine frees the row, or leaves it to be taken back
            self.rows.free([seq.seq_id])
            self.counts["free"] += 1

    def _move_some(self) -> None:
        rng = self.rng
        if len(self.running) < self.num_rows and rng.random() < 0.6:
            if self.waiting and rng.random() < 0.5:
                seq = self.waiting.pop(0)
                if not self._admit(seq):
                    self.waiting.insert(0, seq)
            else:
                self._admit(self._new_seq())
        if self.running and rng.random() < 0.15:
            seq = rng.choice(self.running)  # preempted: blocks freed, recomputed later
            self._leave(seq, SequenceStatus.WAITING, free_blocks=True)
            seq.token_ids = seq.token_ids[: rng.randrange(1, len(seq) + 1)]
            seq.num_computed_tokens = 0
            self.waiting.append(seq)
            self.counts["preempt"] += 1
        if self.running and rng.random() < 0.15:
            seq = rng.choice(self.running)
            if rng.random() < 0.3:  # held for a KV transfer: blocks kept, row not needed
                self._leave(seq, SequenceStatus.HELD, free_blocks=False)
                self.counts["hold"] += 1
            else:
                self._leave(seq, SequenceStatus.FINISHED, free_blocks=True)
                self.counts["finish"] += 1
            self.ended.append(seq)
        for seq in [s for s in self.ended if s.status is SequenceStatus.HELD]:
            if rng.random() < 0.2:  # released
                self.blocks.free(seq)
                seq.status = SequenceStatus.FINISHED

    def step(self) -> None:
        self._move_some()
        rng = self.rng
        scheduled = [s for s in self.running if rng.random() < 0.8]
        for seq in scheduled:  # one token, or a chunk, where blocks allow
            num_new = min(rng.choice((1, 1, 1, 3, 9)), self.max_blocks * BLOCK_SIZE - len(seq))
            if num_new > 0 and self.blocks.grow(seq, len(seq) + num_new):
                seq.token_ids += [rng.randrange(2) for _ in range(num_new)]
            seq.num_computed_tokens = len(seq)
            self.blocks.commit(seq)  # full blocks become prefix-cache hits for later sequences
        clears, writes = [], []
        rows = [self.rows.row_of(seq, clears, writes) for seq in scheduled]
        assert len(set(rows)) == len(rows), "two running sequences share a row"
        self.device_tables.update(clears, writes)
        if scheduled:
            got = self.device_tables.tables[rows]
            expected = fresh_rows([s.block_table for s in scheduled], self.max_blocks)
            assert torch.equal(got, expected)
            # what an eager step reads: as many columns as the longest table
            width = max(len(s.block_table) for s in scheduled)
            gathered = self.device_tables.gather(torch.tensor(rows), width)
            assert torch.equal(gathered, fresh_rows([s.block_table for s in scheduled], width))


@pytest.mark.parametrize("seed", range(8))
def test_incremental_rows_equal_fresh_tables(seed):
    schedule = RandomSchedule(seed)
    for _ in range(300):
        schedule.step()
    # the schedule went through every kind of event it is meant to test
    assert all(n > 0 for n in schedule.counts.values()), schedule.counts


def test_rows_of_sequences_no_longer_running_are_taken_back():
    rows = BlockTableRows(num_rows=2, max_blocks=4)
    a, b, c = (Sequence(i, i, 0, [1], 1, SamplingParams(), block_table=[7]) for i in "abc")
    for seq in (a, b, c):
        seq.status = SequenceStatus.RUNNING
    rows.row_of(a, [], [])
    rows.row_of(b, [], [])
    with pytest.raises(RuntimeError, match="no block-table row is free"):
        rows.row_of(c, [], [])
    a.status = SequenceStatus.HELD
    clears, writes = [], []
    assert rows.row_of(c, clears, writes) == 0  # a's row, cleared and written for c
    assert clears == [0] and writes == [0, 0, 7]


def test_steady_decode_sends_nothing_until_a_block_is_appended():
    rows = BlockTableRows(num_rows=4, max_blocks=8)
    seq = Sequence("a", "a", 0, [1, 2], 2, SamplingParams(), block_table=[5])
    seq.status = SequenceStatus.RUNNING
    clears, writes = [], []
    rows.row_of(seq, clears, writes)
    assert (clears, writes) == ([0], [0, 0, 5])
    clears, writes = [], []
    rows.row_of(seq, clears, writes)
    assert (clears, writes) == ([], [])
    seq.block_table.append(9)
    rows.row_of(seq, clears, writes)
    assert (clears, writes) == ([], [0, 1, 9])


def test_device_tables_refuse_indices_out_of_range():
    tables = DeviceBlockTables(num_rows=2, max_blocks=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="row out of range"):
        tables.update([2], [])
    with pytest.raises(ValueError, match="column out of range"):
        tables.update([], [0, 3, 1])
    with pytest.raises(ValueError, match="triples"):
        tables.update([], [0, 1])
    assert not tables.tables.any()


def test_a_table_longer_than_a_row_is_refused():
    rows = BlockTableRows(num_rows=1, max_blocks=2)
    seq = Sequence("a", "a", 0, [1], 1, SamplingParams(), block_table=[1, 2, 3])
    with pytest.raises(ValueError, match="more than a row holds"):
        rows.row_of(seq, [], [])


# -- through the engine -------------------------------------------------------------------------


def as_own_tables(batch: StepBatch, seqs: list[Sequence]) -> StepBatch:
    """The same step as a batch that carries its sequences' whole tables."""
    return StepBatch(
        batch.input_ids, batch.positions, batch.slot_mapping, batch.query_lens, batch.seq_lens,
        batch.sample_indices, batch.sampling_rows, block_tables=[list(s.block_table) for s in seqs],
        finished_seq_ids=batch.finished_seq_ids, prompt_logprob_rows=batch.prompt_logprob_rows,
    )  # fmt: skip


class StepSpy:
    """Wraps an engine's batch building and runner: checks every step's persistent rows against
    its sequences' tables and, with `own_tables`, runs the step from whole tables instead."""

    def __init__(self, engine, own_tables: bool = False):
        self.engine, self.own_tables = engine, own_tables
        self.seqs: list[Sequence] = []
        self.num_steps = self.num_writes = 0
        build, execute = engine._build_batch, engine.runner.execute_step

        def build_batch(out):
            self.seqs = [item.seq for item in out.scheduled]
            return build(out)

        def execute_step(batch):
            self.num_steps += 1
            self.num_writes += len(batch.table_writes) // 3
            if self.own_tables:
                runner = engine.runner
                runner.block_tables.update(batch.table_clears, batch.table_writes)
                batch = as_own_tables(batch, self.seqs)
            elif batch.input_ids:
                self.check(batch)
            return execute(batch)

        engine._build_batch, engine.runner.execute_step = build_batch, execute_step

    def check(self, batch: StepBatch) -> None:
        runner = self.engine.runner
        own = as_own_tables(batch, self.seqs)
        runner.block_tables.update(batch.table_clears, batch.table_writes)  # what execute does
        persistent = runner._metadata(batch)
        fresh = runner._metadata(own)
        for name in ("slot_mapping", "query_start_loc", "seq_lens"):
            assert torch.equal(getattr(persistent, name), getattr(fresh, name)), name
        for i, (seq_len, seq) in enumerate(zip(batch.seq_lens, self.seqs, strict=True)):
            used = -(-seq_len // self.engine.config.block_size)
            assert persistent.block_tables[i, :used].tolist() == seq.block_table[:used]
            assert fresh.block_tables[i, :used].tolist() == seq.block_table[:used]
        # the whole row, beyond what the step reads, too
        rows = runner.block_tables.tables[batch.table_rows]
        width = rows.shape[1]
        assert torch.equal(rows, fresh_rows([s.block_table for s in self.seqs], width))


def prompts(seed: int, lens: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 384) for _ in range(9)]  # shared: prefix-cache hits
    return [prefix + [rng.randrange(3, 384) for _ in range(n)] for n in lens]


# few blocks and sequences: preemption by recompute, chunked prefill, rows reused
TIGHT = {"num_kv_blocks": 16, "block_size": 4, "max_num_seqs": 4, "max_num_batched_tokens": 16}


def run(path, own_tables: bool, **kwargs):
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 14, 3, 20, 9, 1)
    ]
    with LLM(str(path), device="cpu", dtype="float32", **TIGHT, **kwargs) as llm:
        spy = StepSpy(llm.engine, own_tables)
        outputs = llm.generate(prompts(0, [1, 12, 30, 5, 19, 7]), params, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outputs]
        assert llm.engine.num_free_blocks == llm.engine.block_manager.num_blocks
        preemptions = llm.engine.scheduler.num_preemptions
    return tokens, spy, preemptions


def test_engine_steps_read_the_same_tables_and_tokens(checkpoint):
    path = checkpoint("llama3")
    tokens, spy, preemptions = run(path, own_tables=False)
    assert preemptions > 0 and spy.num_steps > 20 and spy.num_writes > 0
    own_tokens, _, own_preemptions = run(path, own_tables=True)
    assert own_preemptions == preemptions
    assert tokens == own_tokens
