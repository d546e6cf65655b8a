"""`LocalEngineBackend`: a `ServingBackend` over one in-process `LLMEngine` (mixed role).

The engine runs on an `EngineLoop` (pdray/engine/loop.py), the same loop a Serve replica uses.
Each request's outputs reach its consumer through an `AsyncSink` on the consumer's own event loop;
outputs are cumulative, so a consumer that falls behind just sees fewer, larger steps.

Lifecycle of a request: generate() -> submit (a ValueError goes back to the caller) -> outputs
until finished. Leaving generate() early (aclose, cancellation) or abort() frees the request's
blocks on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pdray.config import Role
from pdray.engine.loop import AsyncSink, EngineLoop
from pdray.engine.role_worker import MixedWorker
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdray.engine.llm_engine import LLMEngine


class LocalEngineBackend:
    """Serve one `LLMEngine` from a background thread; close() (or `with`) stops it."""

    def __init__(self, engine: LLMEngine):
        if engine.config.role is not Role.MIXED:
            raise ValueError(
                f"LocalEngineBackend runs a mixed-role engine, got role={engine.config.role.value}"
            )
        self.engine = engine
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.arch.vocab_size
        # Tokenizing on the event loop while the engine thread detokenizes can trip fast
        # tokenizers ("Already borrowed"), so the HTTP side gets its own copy.
        try:
            self._tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:
            self._tokenizer = engine.tokenizer
        self._loop = EngineLoop(_Borrowed(engine), name="pdray-engine")

    # -- ServingBackend ---------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        sink = AsyncSink()
        worker = self._loop.worker
        await asyncio.wrap_future(
            self._loop.submit(request_id, sink, lambda: worker.add(request_id, prompt, params))
        )
        async for output in self._loop.stream(request_id, sink):
            yield output

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once the engine thread has freed its blocks."""
        with contextlib.suppress(RuntimeError):  # closed: nothing left to free
            await asyncio.wrap_future(self._loop.abort(request_id))

    def close(self, timeout_s: float = 30.0) -> None:
        self._loop.close(timeout_s)

    def __enter__(self) -> LocalEngineBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Borrowed(MixedWorker):
    """The caller owns the engine: closing the backend leaves it open."""

    def close(self) -> None:
        pass
