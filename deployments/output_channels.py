"""Output channels: one Serve stream per (router replica, engine replica) carries the outputs of
every request that router has on that engine, a batch per engine step.

Why: a Serve streaming call costs a fixed amount per item, whatever its size: on our CPU about
0.6 ms of the caller's CPU and 650 items/s for 64 streams of one item per token, against 12 us an
item when 64 requests' outputs travel in one item (docs/performance.md, "Output channels"). With
one stream per request, a decode replica sent one item per token of every request and stopped at
~1.2k tokens/s on two H200s whatever its GPU could do. A channel sends one item per engine step
(and per router), so the cost no longer grows with the number of tokens in flight.

  router replica                                 engine replica (Decode or Mixed)
  ChannelClient per instance                     ChannelHub
    request(id, call): register a sink, -------> reserve / generate(..., channel=ID): the
    make the call (its reply: a ticket)          request's sink feeds the channel
    _run: reads channel(ID) <------------------- channel(ID): a batch [(request id, item)] per
    and hands each item to its request's sink   wake-up: the latest output of each request (they
                                                 are cumulative), its prompt sent once

Lifecycle. A replica's channel stream ends when it has had no request for IDLE_S; the client
reopens it while it still has requests (one can be on its way to the replica). The stream raising
(the replica died or was replaced) ends every request on it with that error, which the router
treats as the instance failing. A stream closed by its caller (the router went away) aborts the
requests left on it; a router that dies without closing it leaves them to the replica's reaper
(`CallerDeadlines`). Items for a request the other side no longer has are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pdray.deployments.stream_codec import PromptElider, PromptRestorer

from pdray.engine.loop import AsyncSink
from pdray.engine.role_worker import RequestFailed, StreamItem, ends_stream

IDLE_S = 10.0  # a replica ends a channel stream with no request for this long

Batch = list[tuple[str, StreamItem]]


# -- engine replica -------------------------------------------------------------------------------


class _Channel:
    """One router's requests on this replica (the hub's lock guards every field)."""

    def __init__(self) -> None:
        self.pending: dict[str, StreamItem] = {}  # request id -> its latest unsent item
        self.eliders: dict[str, PromptElider] = {}  # requests not yet ended on the wire
        self.open: set[str] = set()  # requests whose engine stream has not ended
        self.event: asyncio.Event | None = None  # set by the engine thread: items pending
        self.woken = False


class ChannelHub:
    """A replica's channels, keyed by the id each router's ChannelClient chose. `sink` and
    `stream` run on the replica's event loop, the sinks' `put` on the engine's thread.
    `ended(request_id)` is called once a request's final item is queued; `abort(request_id)`
    for the requests of a channel its router closed."""

    def __init__(
        self,
        ended: Callable[[str], None],
        abort: Callable[[str], None],
        idle_s: float = IDLE_S,
    ):
        self._ended, self._abort, self.idle_s = ended, abort, idle_s
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def sink(self, channel_id: str, request_id: str) -> _ChannelSink:
        """The engine-side sink of a request whose outputs go to `channel_id` (event loop)."""
        self._loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.setdefault(channel_id, _Channel())
            channel.eliders[request_id] = PromptElider()
            channel.open.add(request_id)
        return _ChannelSink(self, channel, request_id)

    def drop(self, channel_id: str, request_id: str) -> None:
        """Forget a request that did not start (its submit failed, or reserve found no room)."""
        with self._lock:
            channel = self._channels.get(channel_id)
            if channel is not None:
                channel.open.discard(request_id)
                channel.eliders.pop(request_id, None)
                channel.pending.pop(request_id, None)

    def _put(self, channel: _Channel, request_id: str, item: StreamItem) -> None:
        """Engine thread. Outputs are cumulative: a newer one replaces one not yet sent."""
        final = ends_stream(item)
        with self._lock:
            if request_id not in channel.open:
                return
            channel.pending[request_id] = item
            if final:
                channel.open.discard(request_id)
            wake, channel.woken = not channel.woken, True
            event, loop = channel.event, self._loop
        if wake and event is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(event.set)
        if final:
            self._ended(request_id)

    async def stream(self, channel_id: str) -> AsyncIterator[Batch]:
        """The channel's batches until it has been idle for `idle_s` (event loop)."""
        self._loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.setdefault(channel_id, _Channel())
            channel.event = event = asyncio.Event()
            channel.woken = False
        if channel.pending:
            event.set()
        idle = False
        try:
            while True:
                try:
                    await asyncio.wait_for(event.wait(), self.idle_s)
                except asyncio.TimeoutError:  # (not the builtin on Python 3.10)
                    with self._lock:
                        if not channel.open and not channel.pending:
                            del self._channels[channel_id]
                            idle = True
                            return
                    continue
                event.clear()
                with self._lock:
                    pending, channel.pending, channel.woken = channel.pending, {}, False
                    batch = []
                    for request_id, item in pending.items():
                        elide = channel.eliders.get(request_id)
                        if elide is None:
                            continue
                        batch.append((request_id, elide(item)))
                        if ends_stream(item):
                            del channel.eliders[request_id]
                if batch:
                    yield batch
        finally:
            if not idle:  # closed by its caller, or cancelled: nobody reads these requests
                with self._lock:
                    left = sorted(channel.open)
                    if self._channels.get(channel_id) is channel:
                        del self._channels[channel_id]
                for request_id in left:
                    self._ended(request_id)
                    self._abort(request_id)

    def __len__(self) -> int:
        return len(self._channels)


class _ChannelSink:
    """What the engine loop puts a request's items into (pdray/engine/loop.py `Sink`)."""

    __slots__ = ("hub", "channel", "request_id")

    def __init__(self, hub: ChannelHub, channel: _Channel, request_id: str):
        self.hub, self.channel, self.request_id = hub, channel, request_id

    def put(self, item: StreamItem) -> None:
        self.hub._put(self.channel, self.request_id, item)


# -- router replica -------------------------------------------------------------------------------


class ChannelClient:
    """A router's end of one engine replica's channel. `open_stream(channel_id)` makes the
    streaming call (`channel` on that replica); `closed(client)` is called when the client ends
    (no request left, or the stream failed)."""

    def __init__(
        self,
        open_stream: Callable[[str], AsyncIterator[Batch]],
        closed: Callable[[ChannelClient], None] = lambda client: None,
    ):
        self.id = uuid.uuid4().hex
        self._open_stream, self._closed = open_stream, closed
        self._sinks: dict[str, AsyncSink] = {}
        self._task: asyncio.Task | None = None
        self.error: Exception | None = None

    async def request(
        self, request_id: str, call: Callable[[str], Awaitable[Any]], reply: bool = False
    ) -> AsyncIterator[Any]:
        """Register the request, then `await call(channel_id)` (its reply first when `reply`:
        a decode ticket, None ending the stream), then the request's items up to its final one.
        Its end (or the consumer leaving) unregisters it."""
        if self.error is not None:
            raise self.error
        sink = self._sinks[request_id] = AsyncSink()
        if self._task is None:
            # Not in this request's context: the channel serves every request, and Serve's
            # handle router spins on two pending calls to one deployment that carry the same
            # (inherited) internal request id, as this call and the request's `reserve` would.
            self._task = contextvars.Context().run(asyncio.ensure_future, self._run())
        try:
            answer = await call(self.id)
            if reply:
                yield answer
                if answer is None:
                    return
            restore = PromptRestorer()  # the replica sends the prompt with the first output
            async for item in sink.outputs():
                yield restore(item)
        finally:
            if self._sinks.get(request_id) is sink:
                del self._sinks[request_id]

    async def _run(self) -> None:
        try:
            while self._sinks:  # reopened while requests remain (the replica ended it idle)
                async for batch in self._open_stream(self.id):
                    for request_id, item in batch:
                        sink = self._sinks.get(request_id)
                        if sink is not None:
                            sink.deliver(item)
        except Exception as e:  # the replica died or was replaced: every request here fails
            self.error = e
            for request_id, sink in self._sinks.items():
                sink.deliver(RequestFailed(request_id, e))
        finally:
            self._closed(self)

    def __len__(self) -> int:
        return len(self._sinks)
