"""What an engine loop drives: a role worker (mixed, prefill or decode) and what it emits.

A role worker owns one `LLMEngine` (and, for prefill/decode, its KV transfer side) and is only
ever called from the thread of its `EngineLoop` (pdray/engine/loop.py). Per request it emits, in
order, any number of `RequestOutput`s (cumulative) and ends the request's stream with exactly one
final item:

  mixed / decode   RequestOutput(finished=True), or RequestFailed
  prefill          the first-token RequestOutput (finished=False: decode continues it) as soon as
                   it is sampled, then PrefillResult once the KV hand-off is done (or failed)

A request aborted by its caller emits nothing more.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pdray.outputs import RequestOutput

if TYPE_CHECKING:
    from pdray.engine.llm_engine import LLMEngine


@dataclass
class PrefillResult:
    """The end of a request on a prefill engine: its KV and first token reached decode (error
    None) or not (decode applies its failure policy)."""

    request_id: str
    output: RequestOutput | None
    error: str | None = None


class FailureKind(str, enum.Enum):
    RETRY = "retry"  # the KV did not arrive: the caller may try another prefill/decode pair
    FAILED = "failed"  # the request failed on this instance


class HandoffFailed(RuntimeError):
    """A decode instance did not get a request's KV and its policy is not to recompute it."""

    def __init__(self, kind: FailureKind, reason: str):
        super().__init__(f"{kind.value}: {reason}")
        self.kind, self.reason = kind, reason

    def __reduce__(self):  # crosses processes (Ray, pipes) intact
        return HandoffFailed, (self.kind, self.reason)


@dataclass
class RequestFailed:
    """The end of a request that failed on this engine."""

    request_id: str
    error: Exception


StreamItem = RequestOutput | PrefillResult | RequestFailed
Emit = Callable[[str, StreamItem], None]


def ends_stream(item: StreamItem | BaseException) -> bool:
    return not isinstance(item, RequestOutput) or item.finished


class RoleWorker(Protocol):
    """The interface an `EngineLoop` drives. Only the loop's thread calls these."""

    engine: LLMEngine

    def has_work(self) -> bool:
        """Anything unfinished, including KV still in flight."""
        ...

    def has_runnable_work(self) -> bool:
        """A step would compute something now (False while only waiting for KV)."""
        ...

    def step(self, emit: Emit) -> None:
        """Deliver what arrived (admissions, hand-off results), then run one forward."""
        ...

    def next_deadline_s(self) -> float | None:
        """time.monotonic() by which `step` must run even if nothing wakes the loop (a lease
        expiry, a peer to poll); None: only a wake-up brings news."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free its blocks; unknown ids are ignored."""
        ...

    def close(self) -> None: ...


class MixedWorker:
    """A mixed-role engine: prefill and decode in one place."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def add(self, request_id: str, prompt, params) -> None:
        self.engine.add_request(request_id, prompt, params)

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def has_runnable_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self, emit: Emit) -> None:
        for output in self.engine.step():
            emit(output.request_id, output)

    def next_deadline_s(self) -> float | None:
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.engine.abort_request(request_id)

    def close(self) -> None:
        self.engine.close()


def collect(step: Callable[[Emit], None]) -> list[StreamItem]:
    """Run one step and return what it emitted (for callers that drive a worker by hand)."""
    items: list[StreamItem] = []
    step(lambda _request_id, item: items.append(item))
    return items
