from __future__ import annotations

import subprocess
import sys

from pdray.engine.block_manager import BlockManager
from pdray.engine.scheduler import Scheduler
from pdray.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdray.sampling_params import SamplingParams


def make_seq(n: int, seq_id: str, start: int = 0) -> Sequence:
    tokens = list(range(start, start + n))
    return Sequence(seq_id, seq_id, 0, tokens, n, SamplingParams())


class Step:
    def __init__(self, out):
        self.preempted = out.preempted
        self.plan = [(s.seq.seq_id, s.num_new_tokens, s.samples) for s in out.scheduled]

    @property
    def ids(self) -> list[str]:
        return [seq_id for seq_id, _, _ in self.plan]

    @property
    def sizes(self) -> list[tuple[str, int]]:
        return [(seq_id, n) for seq_id, n, _ in self.plan]


def run_step(sched: Scheduler, next_token: int = 7) -> Step:
    out = sched.schedule()
    step = Step(out)
    sampling = [item.seq for item in out.scheduled if item.samples]
    sched.update_after_step(out)
    for seq in sampling:
        seq.token_ids.append(next_token)
    return step


def test_modules_do_not_import_torch():
    code = (
        "import sys, pdray.engine.scheduler, pdray.engine.block_manager;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_prefill_respects_token_budget():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make_seq(25, "a"), make_seq(3, "b", 100)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert out.plan == [("a", 10, False)]
    out = run_step(sched)
    assert out.sizes == [("a", 10)]
    out = run_step(sched)
    # a finishes its prompt (5) and samples; b joins with the rest of the budget.
    assert out.plan == [
        ("a", 5, True),
        ("b", 3, True),
    ]
    out = run_step(sched)
    assert out.sizes == [("a", 1), ("b", 1)]
    for seq in (a, b):
        sched.finish(seq, FinishReason.LENGTH)
    assert bm.num_free_blocks == 64 and not sched.has_work


def test_max_num_seqs_limits_running():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(3, f"s{i}", 10 * i) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    out = run_step(sched)
    assert len(out.plan) == 2 and len(sched.waiting) == 1
    sched.finish(seqs[0], FinishReason.STOP)
    out = run_step(sched)
    assert set(out.ids) == {"s1", "s2"}
    for seq in seqs[1:]:
        sched.finish(seq, FinishReason.STOP)
    assert bm.num_free_blocks == 64


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_seq(4, "a"), make_seq(4, "b", 50)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, cache full; each appended a token
    out = run_step(sched)
    # a needs a 3rd block: b (admitted last) is preempted and recomputed later.
    assert out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert out.ids == ["a"]
    sched.finish(a, FinishReason.STOP)
    out = run_step(sched)
    assert out.sizes == [("b", 5)]
    sched.finish(b, FinishReason.STOP)
    assert bm.num_free_blocks == 4


def test_held_and_remote_paths_free_exactly_once():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = make_seq(6, "a")
    sched.add(a)
    run_step(sched)
    sched.finish(a, None, hold=True)
    assert a.status is SequenceStatus.HELD and bm.num_free_blocks == 14
    assert sched.release("a") is a and bm.num_free_blocks == 16
    assert sched.release("a") is None

    d = make_seq(6, "d", 30)
    assert sched.reserve_for_remote_kv(d)
    assert d.status is SequenceStatus.AWAITING_KV and bm.num_free_blocks == 14
    sched.abort(d)
    sched.abort(d)
    assert bm.num_free_blocks == 16

    e = make_seq(6, "e", 30)
    assert sched.reserve_for_remote_kv(e)
    sched.admit_remote("e")
    e.token_ids.append(3)
    out = run_step(sched)
    assert out.plan == [("e", 1, True)]
    sched.finish(e, FinishReason.STOP)
    assert bm.num_free_blocks == 16


def test_reservation_fails_cleanly_when_cache_full():
    bm = BlockManager(2, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    big = make_seq(12, "big")
    assert not sched.reserve_for_remote_kv(big)
    assert bm.num_free_blocks == 2 and not sched.awaiting_kv


def test_prefill_engines_take_smaller_steps_by_default():
    from pdray.config import PREFILL_STEP_TOKENS, EngineConfig

    mixed = EngineConfig(model="dummy:tiny")
    assert mixed.max_num_batched_tokens == mixed.first_chunk_tokens == mixed.max_step_tokens == 8192
    prefill = EngineConfig(model="dummy:tiny", role="prefill")
    assert prefill.max_num_batched_tokens == PREFILL_STEP_TOKENS == 2048
    assert prefill.first_chunk_tokens == prefill.max_step_tokens == 8192  # a lone prompt
    explicit = EngineConfig(model="dummy:tiny", role="prefill", max_num_batched_tokens=8)
    assert explicit.max_num_batched_tokens == explicit.first_chunk_tokens == 8  # caps every step
    assert prefill.replace(role="mixed").max_num_batched_tokens == 2048  # stays what it was
    small = EngineConfig(model="dummy:tiny", max_num_batched_tokens=512, first_chunk_tokens=4096)
    assert small.max_step_tokens == 4096


def test_a_lone_prompt_is_not_cut_but_others_join_only_within_the_budget():
    """Budget 4, first chunk 12: a step's first prompt takes up to 12 tokens; a second prompt
    joins only while the budget of 4 has room; a 20-token prompt still goes in chunks of 12."""
    bm = BlockManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4, first_chunk_tokens=12)
    for seq in (make_seq(10, "a"), make_seq(3, "b", 100), make_seq(20, "c", 200)):
        sched.add(seq)
    assert run_step(sched).plan == [("a", 10, True)]  # was 4 + 4 + 2 over three steps
    # a decodes (1 token, the step's first), b joins within the budget, c gets what is left
    assert run_step(sched).sizes == [("a", 1), ("b", 3)]
    sched.finish(sched.running[0], FinishReason.STOP)
    sched.finish(sched.running[0], FinishReason.STOP)
    assert run_step(sched).sizes == [("c", 12)]
    assert run_step(sched).sizes == [("c", 8)]
    without = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=4)
    without.add(make_seq(10, "a"))
    assert run_step(without).sizes == [("a", 4)]  # first_chunk_tokens defaults to the budget


def test_a_request_with_several_sequences_yields_its_own_before_a_single_one():
    """Blocks run out: the victim is the newest sequence of the request running the most (a
    large-n request cannot push a one-sequence request out), not the newest overall."""
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    tokens = [5, 6]
    big = [Sequence(f"big-{i}", "big", i, list(tokens), 2, SamplingParams()) for i in range(2)]
    short = Sequence("short", "short", 0, [7, 8], 2, SamplingParams())
    for seq in [*big, short]:
        sched.add(seq)
    run_step(sched)  # three prompts prefilled: one block each, a token appended to each
    out = run_step(sched)  # each needs a 2nd block; one is free
    assert out.preempted == [big[1]]  # LIFO would have taken `short`
    assert short.status is SequenceStatus.RUNNING and out.ids == ["big-0", "short"]
