"""Ray metrics of a pdray application, defined with `ray.util.metrics`.

Ray serves them on every node's metrics export port in Prometheus text, each name prefixed with
`ray_` (counters also get `_total`); the Ray dashboard's Grafana and any Prometheus scrape them
there. Recording stays in the process (Ray ships values to the node's agent in the background),
so nothing here makes a remote call, and nothing runs per token:
  router   per request: TTFT, time per output token, end-to-end latency, final status, and the
           spans of a PD request's first two tokens (`Span`; `pdray_request_span_seconds`,
           tag `span`), also returned to the client in the final usage (`pdray_spans_s`);
           per pick: one routing decision (picked, failed, or no_instance when it answers 503)
  replica  per heartbeat (every scheduler_ttl_s / 3): waiting and running requests, queued
           prompt tokens, KV cache usage, and what its KV transfer counters grew by since the
           previous heartbeat
Tags: `role` (prefill, decode, mixed) and `replica` (the Serve replica id, as in the Redis records).
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from pdray.kv_transfer.metrics import TransferMetrics
from pdray.outputs import RequestOutput
from pdray.router.store import InstanceRecord

TTFT_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 20, 60]
TPOT_BOUNDARIES_S = [0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1]
E2E_BOUNDARIES_S = [0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600]
_TAGS = ("role", "replica")


class RequestStatus(str, enum.Enum):
    """How a request ended, as the router saw it (finish reasons, then failures)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"  # the engine aborted it
    ABORTED = "aborted"  # the client left (or the HTTP layer closed the stream) before the end
    INVALID = "invalid"  # a bad request the engine refused (HTTP 400)
    NO_CAPACITY = "no_capacity"  # no instance could take it (HTTP 503)
    TIMEOUT = "timeout"  # request_timeout_s ran out; aborted on its instances (HTTP 504)
    ERROR = "error"  # an instance failed, e.g. died after streaming tokens (HTTP 500)


class Span(str, enum.Enum):
    """Where a PD request's time to first (and second) token goes. Router spans are measured
    from the router receiving the request; the others on the instance, as durations."""

    RESERVED = "reserved"  # router: decode's ticket arrived (its `reserve` call answered)
    FIRST_TOKEN = "first_token"  # router: the first token arrived (from prefill)
    SECOND_TOKEN = "second_token"  # router: the second token arrived (from decode)
    PREFILL_QUEUE = "prefill_queue"  # prefill: submitted -> first scheduled
    PREFILL_FIRST_TOKEN = "prefill_first_token"  # prefill: submitted -> first token sampled
    DECODE_ADMITTED = "decode_admitted"  # decode: reserved -> KV complete and admitted


SPAN_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                     0.5, 0.75, 1, 2, 5, 10, 30]  # fmt: skip


class RoutingOutcome(str, enum.Enum):
    PICKED = "picked"  # the router chose this instance
    FAILED = "failed"  # a call to it failed before the first token: marked down, next pair
    NO_INSTANCE = "no_instance"  # nothing of this role could take the request (503)
    FULL = "full"  # a decode instance had no free KV blocks for it: another one, or wait


@functools.cache
def _metrics() -> SimpleNamespace:
    """The Ray metric objects, created once per process on first use."""
    from ray.util.metrics import Counter, Gauge, Histogram

    def gauge(name: str, description: str) -> Gauge:
        return Gauge(name, description=description, tag_keys=_TAGS)

    def counter(name: str, description: str, *extra: str) -> Counter:
        return Counter(name, description=description, tag_keys=_TAGS + extra)

    def histogram(name: str, description: str, boundaries: list[float]) -> Histogram:
        return Histogram(name, description=description, boundaries=boundaries, tag_keys=_TAGS)

    return SimpleNamespace(
        ttft=histogram(
            "pdray_time_to_first_token_seconds",
            "Time from the router receiving a request to its first token.",
            TTFT_BOUNDARIES_S,
        ),
        tpot=histogram(
            "pdray_time_per_output_token_seconds",
            "Mean time between output tokens after the first, one value per request.",
            TPOT_BOUNDARIES_S,
        ),
        e2e=histogram(
            "pdray_e2e_request_latency_seconds",
            "Time from the router receiving a request to its last token (finished ones).",
            E2E_BOUNDARIES_S,
        ),
        span=Histogram(
            "pdray_request_span_seconds",
            description="Spans of a PD request's first two tokens (see deployments/metrics.Span).",
            boundaries=SPAN_BOUNDARIES_S,
            tag_keys=(*_TAGS, "span"),
        ),
        requests=counter("pdray_requests", "Requests ended, by status.", "status"),
        routing=counter("pdray_routing_decisions", "Instance picks by the router.", "outcome"),
        waiting=gauge("pdray_waiting_requests", "Requests queued on a replica, not running."),
        running=gauge("pdray_running_requests", "Requests running on a replica."),
        queued_tokens=gauge("pdray_queued_prefill_tokens", "Prompt tokens not yet prefilled."),
        kv_usage=gauge("pdray_kv_cache_usage", "Used fraction of a replica's KV blocks (0-1)."),
        kv_bytes=counter(
            "pdray_kv_transfer_bytes",
            "KV bytes sent (prefill) or received into completed requests (decode).",
        ),
        kv_seconds=counter(
            "pdray_kv_transfer_seconds", "Decode: time from reserving to the KV being complete."
        ),
        kv_completed=counter("pdray_kv_transfers", "Decode: requests whose KV arrived whole."),
        kv_failures=counter("pdray_kv_transfer_failures", "Failed KV sends or receptions."),
        kv_expired=counter("pdray_kv_expired_leases", "Decode: leases expired before the KV."),
    )


@dataclass(slots=True)
class RequestTrace:
    """Timing of one request at the router; `record()` once when it ends."""

    start_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_tokens: int = 0
    role: str = ""  # the instance streaming the tokens: decode or mixed
    replica: str = ""
    spans: dict[Span, float] = field(default_factory=dict)

    def mark(self, span: Span, now_s: float | None = None) -> None:
        """The router reached `span` now (or at `now_s`, a time.monotonic())."""
        now_s = time.monotonic() if now_s is None else now_s
        self.spans.setdefault(span, now_s - self.start_s)

    def observe(self, source: str, output: RequestOutput) -> None:
        """An instance's output (passed on to the client or not): take its own spans."""
        metrics = output.metrics
        if source == "prefill" and "ttft_s" in metrics:
            self.spans.setdefault(Span.PREFILL_FIRST_TOKEN, metrics["ttft_s"])
            if "queue_s" in metrics:
                self.spans.setdefault(Span.PREFILL_QUEUE, metrics["queue_s"])
        elif source == "decode" and "ttft_s" in metrics:
            self.spans.setdefault(Span.DECODE_ADMITTED, metrics["ttft_s"])

    def on_output(self, output: RequestOutput) -> None:
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if num_tokens > self.num_tokens:
            now_s = time.monotonic()
            if self.first_token_s is None:
                self.first_token_s = now_s
                self.mark(Span.FIRST_TOKEN, now_s)
            if self.num_tokens < 2 <= num_tokens:
                self.mark(Span.SECOND_TOKEN, now_s)
            self.last_token_s = now_s
            self.num_tokens = num_tokens
        if output.finished and self.spans:  # the client gets them with the usage
            output.metrics = {
                **output.metrics,
                **{f"span:{k.value}": v for k, v in self.spans.items()},
            }

    def record(self, status: RequestStatus) -> None:
        m = _metrics()
        tags = {"role": self.role, "replica": self.replica}
        if self.first_token_s is not None:
            m.ttft.observe(self.first_token_s - self.start_s, tags)
            if self.num_tokens > 1:
                tpot_s = (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)
                m.tpot.observe(tpot_s, tags)
        if status in (RequestStatus.STOP, RequestStatus.LENGTH) and self.last_token_s:
            m.e2e.observe(self.last_token_s - self.start_s, tags)
        m.requests.inc(1, {**tags, "status": status.value})
        if Span.RESERVED in self.spans:  # a PD request
            for span, value_s in self.spans.items():
                m.span.observe(value_s, {**tags, "span": span.value})


def record_routing(role: str, replica: str, outcome: RoutingOutcome) -> None:
    _metrics().routing.inc(1, {"role": role, "replica": replica, "outcome": outcome.value})


_TRANSFER_COUNTERS = {  # metric -> TransferMetrics fields it sums
    "kv_bytes": ("bytes_sent", "bytes_received"),
    "kv_seconds": ("transfer_time_s",),
    "kv_completed": ("completed",),
    "kv_failures": ("failures",),
    "kv_expired": ("expired_leases",),
}


class ReplicaMetrics:
    """Gauges and transfer counters of one replica, updated from its heartbeat thread."""

    def __init__(self, role: str, replica_id: str, transfer: TransferMetrics | None = None):
        self.tags = {"role": role, "replica": replica_id}
        self.transfer = transfer
        self._exported = dict.fromkeys(_TRANSFER_COUNTERS, 0.0)

    def update(self, record: InstanceRecord) -> None:
        m, tags = _metrics(), self.tags
        m.waiting.set(record.waiting_requests, tags)
        m.running.set(record.running_requests, tags)
        m.queued_tokens.set(record.queued_prefill_tokens, tags)
        if record.total_kv_blocks:
            m.kv_usage.set(1 - record.free_kv_blocks / record.total_kv_blocks, tags)
        if self.transfer is None:
            return
        for name, fields in _TRANSFER_COUNTERS.items():  # Ray counters only grow: add deltas
            total = sum(getattr(self.transfer, f) for f in fields)
            delta = total - self._exported[name]
            if delta > 0:
                getattr(m, name).inc(delta, tags)
                self._exported[name] = total
