"""Continuous batching with chunked prefill and preemption by recompute. No torch.

Each step gets a token budget (max_num_batched_tokens). Running sequences are served first, in
admission order: a decoding sequence takes one token, a sequence still prefilling takes the next
chunk of its prompt. The first sequence of a step may take up to first_chunk_tokens (if that is
more), so a prefill engine with a small budget computes a lone prompt in one step, not in chunks.
Waiting sequences are admitted with what budget is left, after prefix-cache matching. When blocks
run out, the most recently admitted running sequence is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed later.

Queues:  waiting -> running -> (finished | held)          held: prefill role, blocks kept
         awaiting_kv -> running                          decode role, KV written from elsewhere
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from pdray.engine.block_manager import BlockManager
from pdray.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's tokens, so it samples the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        first_chunk_tokens: int | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.first_chunk_tokens = max(first_chunk_tokens or 0, max_num_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}
        self.awaiting_kv: dict[str, Sequence] = {}
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # -- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, self._allowance(budget, out))
            if not self._grow_or_preempt(seq, num_new, scheduled, out):
                continue  # seq itself was preempted (out of `running`): the next one is at i
            out.scheduled.append(ScheduledSeq(seq, num_new))
            scheduled.add(id(seq))
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_table  # admitted remote-KV sequences arrive with their blocks
            if fresh:
                self.block_manager.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, self._allowance(budget, out))
            if not self.block_manager.grow(seq, seq.num_computed_tokens + num_new):
                if fresh:
                    self.block_manager.free(seq)  # undo the prefix match; retry next step
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _allowance(self, budget: int, out: SchedulerOutput) -> int:
        """Tokens the next sequence may take: first_chunk_tokens for a step's first one."""
        return budget if out.scheduled else self.first_chunk_tokens

    def _grow_or_preempt(
        self, seq: Sequence, num_new: int, scheduled: set[int], out: SchedulerOutput
    ) -> bool:
        target = seq.num_computed_tokens + num_new
        while not self.block_manager.grow(seq, target):
            victim = self._victim(scheduled)
            if id(victim) in scheduled:
                raise RuntimeError("KV cache too small for the sequences already scheduled")
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, scheduled: set[int]) -> Sequence:
        """The sequence to preempt: the newest one of the request running the most sequences
        when some request runs several (a request with a large `n` yields its own sequences
        before a one-sequence request loses its place), else the newest running one."""
        counts = Counter(s.request_id for s in self.running)
        most = max(counts.values())
        if most > 1:
            for seq in reversed(self.running):
                if counts[seq.request_id] == most and id(seq) not in scheduled:
                    return seq
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Record that the scheduled tokens' KV is now in the cache (call before appending tokens)."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(item.seq)

    # -- endings ---------------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: FinishReason | None, *, hold: bool = False) -> None:
        """End seq here. With hold, its blocks stay allocated until `release` (prefill role);
        a held sequence without a reason is one that another engine continues."""
        self._remove(seq)
        seq.finish_reason = reason
        if hold:
            seq.status = SequenceStatus.HELD
            self.held[seq.seq_id] = seq
        else:
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq)

    def release(self, seq_id: str) -> Sequence | None:
        """Free a held sequence's blocks. Returns it, or None if it was not held (idempotent)."""
        seq = self.held.pop(seq_id, None)
        if seq is not None:
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Remove seq from wherever it is and free its blocks, exactly once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self._remove(seq)
        self.held.pop(seq.seq_id, None)
        self.awaiting_kv.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or FinishReason.ABORT
        self.block_manager.free(seq)

    def _remove(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)

    # -- decode role: KV computed elsewhere --------------------------------------------------------

    def reserve_for_remote_kv(self, seq: Sequence) -> bool:
        """Allocate blocks for seq's whole prompt (prefix hits reused). False if out of blocks.

        Afterwards, blocks [seq.num_cached_tokens // block_size, ...) are the ones whose KV
        must be written from elsewhere.
        """
        self.block_manager.match_prefix(seq)
        if not self.block_manager.grow(seq, seq.num_prompt_tokens):
            self.block_manager.free(seq)
            return False
        seq.status = SequenceStatus.AWAITING_KV
        self.awaiting_kv[seq.seq_id] = seq
        return True

    def admit_remote(self, seq_id: str) -> Sequence:
        """The prompt's KV has arrived. The caller appends the first token before the next step."""
        seq = self.awaiting_kv.pop(seq_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.commit(seq)
        seq.status = SequenceStatus.WAITING
        # Front of the queue: its KV is already paid for.
        self.waiting.appendleft(seq)
        return seq
