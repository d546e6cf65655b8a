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
        )
