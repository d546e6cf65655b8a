"""A request as the engine tracks it: its sequences (n of them) and their output state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdray.engine.detokenizer import IncrementalDetokenizer
from pdray.engine.sequence import Sequence, SequenceStatus
from pdray.outputs import CompletionOutput, Logprob, RequestOutput
from pdray.sampling_params import SamplingParams


@dataclass
class SeqOutputState:
    detokenizer: IncrementalDetokenizer
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class PromptScores:
    """A request's prompt logprobs while its prompt is computed (SamplingParams.prompt_logprobs).

    Sequence 0 scores the positions its prompt chunks cover (a recompute after preemption scores
    them again, to the same values); the list is handed out only once every position is in.
    """

    entries: list[dict[int, Logprob] | None]  # per prompt position; position 0 stays None
    num_missing: int

    @classmethod
    def for_prompt(cls, num_prompt_tokens: int) -> PromptScores:
        return cls([None] * num_prompt_tokens, num_prompt_tokens - 1)

    @property
    def complete(self) -> bool:
        return self.num_missing == 0

    def set(self, position: int, entry: dict[int, Logprob]) -> None:
        if self.entries[position] is None:
            self.num_missing -= 1
        self.entries[position] = entry


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seqs: list[Sequence]
    states: list[SeqOutputState]
    arrival_time_s: float = field(default_factory=time.monotonic)
    scheduled_time_s: float | None = None  # first scheduled for a forward
    first_token_time_s: float | None = None
    prompt_scores: PromptScores | None = None  # with prompt_logprobs, on an engine computing it

    @property
    def finished(self) -> bool:
        return all(
            seq.finish_reason is not None or seq.status is SequenceStatus.HELD for seq in self.seqs
        )

    def to_output(self) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=state.text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=state.cumulative_logprob,
                logprobs=state.logprobs,
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                stop_reason=seq.stop_reason,
            )
            for seq, state in zip(self.seqs, self.states, strict=True)
        ]
        metrics = {"arrival_time_s": self.arrival_time_s}
        if self.scheduled_time_s is not None:
            metrics["queue_s"] = self.scheduled_time_s - self.arrival_time_s
        if self.first_token_time_s is not None:
            metrics["ttft_s"] = self.first_token_time_s - self.arrival_time_s
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=min(seq.num_cached_tokens for seq in self.seqs),
            metrics=metrics,
            prompt_logprobs=self.prompt_logprobs,
        )

    @property
    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """The prompt's logprobs once every position is scored (never changed afterwards)."""
        scores = self.prompt_scores
        return scores.entries if scores is not None and scores.complete else None

    def needs_prompt_scores(self, seq: Sequence) -> bool:
        return seq.index == 0 and self.prompt_scores is not None and not self.prompt_scores.complete
