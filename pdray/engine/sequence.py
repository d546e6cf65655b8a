"""One sequence of a request: its tokens, its blocks and where it stands.

Lifecycle (mixed role):      WAITING -> RUNNING -> FINISHED
  preemption by recompute:   RUNNING -> WAITING (blocks freed, num_computed_tokens = 0)
prefill role:                RUNNING -> HELD (first token sampled, blocks kept until released)
decode role:                 AWAITING_KV (blocks reserved) -> RUNNING (KV arrived) -> FINISHED

A sequence's KV for tokens [0, num_computed_tokens) is in the cache blocks of `block_table`.
The tokens [num_computed_tokens, len(token_ids)) are what the next steps must compute.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdray.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    AWAITING_KV = "awaiting_kv"
    HELD = "held"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    arrival_time_s: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_hashed_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # False for a request that scores its prompt (prompt_logprobs): it computes every position.
    reuse_prefix_cache: bool = True
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
