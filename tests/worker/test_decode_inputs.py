"""Decode steps from persistent block tables: the CUDA graphs' input staging (on CPU here, the
same code) equals the eager step's metadata, padding included; and on a GPU the graphs replay
such steps as the eager forward computes them."""

from __future__ import annotations

import pytest
import torch

from pdray.config import EngineConfig
from pdray.worker.batch import SamplingRow, StepBatch
from pdray.worker.cuda_graph import DecodeInputs
from pdray.worker.model_runner import ModelRunner

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64
# (row of the persistent tables, block table, context length) of each sequence
SEQS = [(5, [3, 9], 6), (0, [1, 4, 7, 2, 11, 12], 21), (2, [8], 1)]
OTHER_SEQS = [(1, [6, 5, 13, 14, 15], 17), (3, [10], 2)]


def decode_batch(seqs, own_tables: bool) -> StepBatch:
    """One decode token per sequence, at its context's last position."""
    slots = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for _, t, n in seqs]
    batch = StepBatch(
        input_ids=[11 * (i + 1) for i in range(len(seqs))],
        positions=[n - 1 for _, _, n in seqs],
        slot_mapping=slots,
        query_lens=[1] * len(seqs),
        seq_lens=[n for _, _, n in seqs],
        sample_indices=list(range(len(seqs))),
        sampling_rows=[SamplingRow(f"s{i}", temperature=0.0) for i in range(len(seqs))],
    )
    if own_tables:
        batch.block_tables = [list(t) for _, t, _ in seqs]
    else:
        batch.table_rows = [row for row, _, _ in seqs]
        batch.table_clears = [row for row, _, _ in seqs]
        batch.table_writes = [v for row, t, _ in seqs for c, b in enumerate(t) for v in (row, c, b)]
    return batch


def cpu_runner(checkpoint, **kwargs) -> ModelRunner:
    config = EngineConfig(
        model=str(checkpoint("llama3")), device="cpu", dtype="float32", max_num_seqs=8,
        block_size=BLOCK_SIZE, **kwargs,
    )  # fmt: skip
    runner = ModelRunner(config)
    runner.allocate_kv_cache(32, MAX_MODEL_LEN)
    return runner


@pytest.mark.parametrize("own_tables", [False, True])
def test_staged_inputs_equal_the_eager_metadata(checkpoint, own_tables):
    runner = cpu_runner(checkpoint)
    inputs = DecodeInputs(
        max_batch_size=8, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, device=runner.device
    )
    # a wider step first, so the second one's padding rows held real values before
    for seqs, bs in ((OTHER_SEQS + SEQS, 8), (SEQS, 4)):
        batch = decode_batch(seqs, own_tables)
        runner.block_tables.update(batch.table_clears, batch.table_writes)
        tables = None if own_tables else runner.block_tables
        inputs.stage(batch, bs, tables)
        meta = runner._metadata(batch)
        n = len(seqs)
        assert inputs.input_ids[:n].tolist() == batch.input_ids
        assert inputs.positions[:n].tolist() == batch.positions
        assert torch.equal(inputs.slot_mapping[:n], meta.slot_mapping)
        assert torch.equal(inputs.seq_lens[:n], meta.seq_lens)
        width = meta.block_tables.shape[1]
        assert torch.equal(inputs.block_tables[:n, :width], meta.block_tables)
        for i, (_, table, _) in enumerate(seqs):
            assert inputs.block_tables[i, : len(table)].tolist() == table
        # padding: token 0, no KV write, an empty context
        assert inputs.input_ids[n:bs].tolist() == [0] * (bs - n)
        assert inputs.slot_mapping[n:bs].tolist() == [-1] * (bs - n)
        assert inputs.seq_lens[n:bs].tolist() == [0] * (bs - n)
        graph_meta = inputs.metadata(bs, MAX_MODEL_LEN)
        assert graph_meta.query_start_loc.tolist() == list(range(bs + 1))


def test_staging_refuses_tables_of_another_width(checkpoint):
    runner = cpu_runner(checkpoint)
    inputs = DecodeInputs(max_batch_size=4, max_model_len=128, block_size=BLOCK_SIZE, device="cpu")
    batch = decode_batch(SEQS, own_tables=False)
    with pytest.raises(ValueError, match="columns"):
        inputs.stage(batch, 4, runner.block_tables)


def test_eager_steps_from_persistent_rows_equal_steps_from_own_tables(checkpoint):
    runner = cpu_runner(checkpoint)
    runner.kv_cache.normal_(generator=torch.Generator().manual_seed(0))
    persistent = decode_batch(SEQS, own_tables=False)
    own = decode_batch(SEQS, own_tables=True)
    rows = [SamplingRow(f"s{i}", temperature=0.0, num_logprobs=2) for i in range(len(SEQS))]
    persistent.sampling_rows = own.sampling_rows = rows  # logprobs: compare more than tokens
    a, b = runner.execute(persistent), runner.execute(own)
    assert [t.token_id for t in a] == [t.token_id for t in b]
    assert [t.top_logprobs for t in a] == [t.top_logprobs for t in b]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_of_persistent_rows_equal_eager_steps(checkpoint):
    from pdray.attention.base import ForwardContext, forward_context

    config = EngineConfig(
        model=str(checkpoint("llama3")), device="cuda", dtype="float32",
        attention_backend="triton", max_num_seqs=8, block_size=BLOCK_SIZE,
    )  # fmt: skip
    runner = ModelRunner(config)
    runner.allocate_kv_cache(32, MAX_MODEL_LEN)  # persistent tables and the decode graphs
    assert runner.graphs is not None
    runner.kv_cache.normal_()
    for seqs in (OTHER_SEQS + SEQS, SEQS):  # 5 rows of the 8-graph, then 3 of the 4-graph
        persistent = decode_batch(seqs, own_tables=False)
        own = decode_batch(seqs, own_tables=True)
        runner.block_tables.update(persistent.table_clears, persistent.table_writes)
        persistent.table_clears, persistent.table_writes = [], []
        assert runner.graphs.can_run(persistent)
        with torch.inference_mode():
            meta = runner._metadata(own)
            ids = torch.tensor(own.input_ids, device="cuda")
            pos = torch.tensor(own.positions, device="cuda")
            with forward_context(ForwardContext(meta, runner.backend)):
                eager = runner.model.compute_logits(runner.model(ids, pos))
            replayed = runner.graphs.run(persistent, runner.block_tables).clone()
            from_own = runner.graphs.run(own).clone()
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        assert torch.equal(replayed, from_own)
        tokens = [t.token_id for t in runner.execute(persistent)]
        assert tokens == [t.token_id for t in runner.execute(own)]
        assert tokens == eager.argmax(dim=-1).tolist()
