"""The client's view of one PD attempt: the first token from prefill, the rest from decode.

  prefill stream   the first-token RequestOutput as soon as prefill samples it, then its
                   PrefillResult (the hand-off's outcome)
  decode stream    from admission (its first output repeats the first token) to the finished
                   output, or an error

Both are read at once, so whichever side has the first token delivers it (decode does when it
recomputed the prompt after a failed hand-off). `SentTokens` lets through only outputs that add
to what the client already has, so no token is sent twice, and raises `StreamDiverged` if an
output contradicts it (a recompute or retry that sampled differently: unseeded random sampling).
Prompt logprobs (SamplingParams.prompt_logprobs) come only in prefill's first-token output (decode
never computes them): `SentTokens` passes that output on even if decode's first output overtook
it, once, and puts them on every later output, as a mixed engine's outputs all carry them.
A prefill error never ends the attempt: decode's failure policy (lease, recompute, retry, fail)
decides; it is reported through `on_prefill_end`. Nor does a prefill output that an abort ended
(finish reason "abort": the prefill engine dropped the request): decode still continues it. An
abort that ends decode's stream raises `AttemptAborted`: the caller knows whether it asked for it
(a client that left) or not (then the attempt failed; it never looks like a finished request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from pdray.engine.role_worker import PrefillResult
from pdray.outputs import RequestOutput
from pdray.sampling_params import SamplingParams


class StreamDiverged(RuntimeError):
    """An output contradicts tokens the client already has."""


class AttemptAborted(RuntimeError):
    """The decode (or mixed) instance ended the attempt with finish reason "abort"."""


def ended_by_abort(output: RequestOutput) -> bool:
    """An engine's output that ends a request it aborted (EngineLoop's answer to `abort`)."""
    return output.finished and any(c.finish_reason == "abort" for c in output.outputs)


class SentTokens:
    """Token ids of each choice the client has been sent, and the prompt's logprobs once sent."""

    def __init__(self) -> None:
        self._tokens: dict[int, list[int]] = {}
        self._prompt_logprobs: list | None = None

    @property
    def most(self) -> int:
        """Tokens sent of the longest choice."""
        return max((len(t) for t in self._tokens.values()), default=0)

    def admit(self, output: RequestOutput) -> bool:
        """Whether `output` (cumulative) adds tokens or the prompt's logprobs, or ends the request;
        records what it adds. An output without prompt logprobs gets those already sent."""
        grows = output.finished
        if output.prompt_logprobs is None:
            output.prompt_logprobs = self._prompt_logprobs
        elif self._prompt_logprobs is None:
            self._prompt_logprobs = output.prompt_logprobs
            # never an output behind what was sent: the next one carries them then
            grows = all(
                len(c.token_ids) >= len(self._tokens.get(c.index, [])) for c in output.outputs
            )
        for choice in output.outputs:
            sent = self._tokens.get(choice.index, [])
            common = min(len(sent), len(choice.token_ids))
            if list(choice.token_ids[:common]) != sent[:common]:
                raise StreamDiverged(
                    f"choice {choice.index}: token {common and sent[common - 1]} differs from the "
                    "one already streamed (the request was recomputed with unseeded sampling); "
                    "it cannot continue consistently"
                )
            if len(choice.token_ids) > len(sent):
                self._tokens[choice.index] = list(choice.token_ids)
                grows = True
        return grows


def completes_request(output: RequestOutput, params: SamplingParams) -> bool:
    """A prefill engine's first-token output that already ends every choice (a stop, or
    max_tokens reached), so decode has nothing to add."""
    return all(
        c.finish_reason == "stop"
        or (c.finish_reason is not None and len(c.token_ids) >= (params.max_tokens or 1 << 62))
        for c in output.outputs
    )


_END = object()


async def _pump(name: str, items: AsyncIterator, queue: asyncio.Queue) -> None:
    try:
        async for item in items:
            await queue.put((name, item))
    except Exception as e:
        await queue.put((name, e))
    await queue.put((name, _END))


async def pd_outputs(
    prefill: AsyncIterator,
    decode: AsyncIterator[RequestOutput],
    params: SamplingParams,
    sent: SentTokens,
    on_prefill_end: Callable[[PrefillResult | Exception], None],
    observe: Callable[[str, RequestOutput], None] | None = None,
) -> AsyncIterator[RequestOutput]:
    """The client's outputs of one attempt; decode's errors raise, prefill's go to on_prefill_end.
    `observe(source, output)` sees every output of either side, passed on or not."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [
        asyncio.ensure_future(_pump("prefill", prefill, queue)),
        asyncio.ensure_future(_pump("decode", decode, queue)),
    ]
    try:
        while True:
            source, item = await queue.get()
            if observe is not None and isinstance(item, RequestOutput):
                observe(source, item)
            if source == "decode":
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                if ended_by_abort(item):
                    raise AttemptAborted(f"decode aborted {item.request_id}")
                if sent.admit(item):
                    yield item
                    if item.finished:
                        return
            elif isinstance(item, RequestOutput):
                if ended_by_abort(item):
                    continue  # prefill dropped it; decode's lease and policy decide
                if completes_request(item, params):
                    item.finished = True
                if sent.admit(item):
                    yield item
                    if item.finished:
                        return
            elif item is not _END:
                on_prefill_end(item)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for items in (prefill, decode):
            with contextlib.suppress(BaseException):
                await items.aclose()
