"""What crosses from the engine to a worker for one step, and what comes back.

Plain Python (no torch), slotted and picklable, so the same batch can be handed to an in-process
model runner or broadcast to the worker actors of a tensor-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(slots=True)
class SamplingRow:
    """Sampling inputs of one sequence that samples a token this step."""

    seq_id: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_logprobs: int | None = None
    banned_token_ids: list[int] = field(default_factory=list)
    # Only filled when a penalty is used: the sequence's prompt and generated tokens so far.
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None


@dataclass(slots=True)
class SampledToken:
    token_id: int
    # Filled when the row asked for logprobs: log-probability of the sampled token under the
    # model's raw distribution, its rank there (1 = most likely), and the top-k (id, logprob).
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class PromptLogprobRow:
    """Prompt positions of one sequence scored this step (SamplingParams.prompt_logprobs).

    The hidden state of flattened token `first_token_index + j` (prompt position
    `first_position + j`) scores the prompt token `target_ids[j]`, the one after it.
    """

    seq_id: str
    first_token_index: int  # into StepBatch.input_ids
    first_position: int
    target_ids: list[int]
    num_logprobs: int  # top-k beside the prompt token (0: only it)


@dataclass(slots=True)
class PromptLogprobs:
    """Scores of one PromptLogprobRow: per target token its log-probability under the raw
    distribution, its rank there (1 = most likely) and the top-k (ids, logprobs)."""

    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(slots=True)
class StepOutput:
    """What one step returns (on rank 0; other ranks return it empty)."""

    sampled: list[SampledToken] = field(default_factory=list)  # one per sampling row
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # one per prompt row


@dataclass(slots=True)
class StepBatch:
    """Flattened inputs of one forward over several sequences.

    Sequence i contributes query_lens[i] tokens (its uncomputed tokens, or a chunk of them) at the
    end of a context of seq_lens[i] tokens, whose KV lives in the blocks of its block table.

    A batch names those tables in one of two ways. The engine's batches use the runner's
    persistent tables (pdray/worker/block_tables.py): `table_rows[i]` is sequence i's row there,
    and the step first clears the rows in `table_clears`, then writes each (row, column, block id)
    triple of `table_writes` (only what changed since the previous step). A batch built on its own
    (benchmarks, profiling, tests) leaves those empty and carries every table in `block_tables`.
    """

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    # Index into the sequences above of each row that samples, and its sampling inputs.
    sample_indices: list[int]
    sampling_rows: list[SamplingRow]
    block_tables: list[list[int]] = field(default_factory=list)
    table_rows: list[int] = field(default_factory=list)
    table_clears: list[int] = field(default_factory=list)
    table_writes: list[int] = field(default_factory=list)  # flat (row, column, block id) triples
    # Sequences that ended since the last step: the worker drops their per-sequence state.
    finished_seq_ids: list[str] = field(default_factory=list)
    # Sequences whose prompt positions this step also runs the LM head over (every rank does).
    prompt_logprob_rows: list[PromptLogprobRow] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def for_followers(self) -> StepBatch:
        """What the other ranks of a tensor-parallel group are sent (pickled, every step): the
        batch without its sampling rows, since they run the LM head but only rank 0 samples."""
        return replace(self, sampling_rows=[])
