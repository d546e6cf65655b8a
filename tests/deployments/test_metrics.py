"""What deployments/metrics.py records, with fake Ray metric objects (no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray  # noqa: F401 (a dependency the tests need: missing fails)
from pdray.deployments import metrics  # noqa: E402
from pdray.deployments.metrics import (  # noqa: E402
    ReplicaMetrics,
    RequestStatus,
    RequestTrace,
    RoutingOutcome,
    record_routing,
)

from pdray.config import Role  # noqa: E402
from pdray.kv_transfer.metrics import TransferMetrics  # noqa: E402
from pdray.outputs import CompletionOutput, RequestOutput  # noqa: E402
from pdray.router.store import InstanceRecord  # noqa: E402


class FakeMetric:
    def __init__(self):
        self.calls: list[tuple[float, dict]] = []

    def observe(self, value, tags):
        self.calls.append((value, tags))

    inc = set = observe


class FakeMetrics(SimpleNamespace):
    def __getattr__(self, name: str) -> FakeMetric:  # a metric nobody recorded yet
        setattr(self, name, FakeMetric())
        return getattr(self, name)


@pytest.fixture
def recorded(monkeypatch):
    fakes = FakeMetrics()
    monkeypatch.setattr(metrics, "_metrics", lambda: fakes)
    return fakes


def output(num_tokens: int, finish_reason: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, "", list(range(num_tokens)), finish_reason=finish_reason)
    return RequestOutput("r", None, [1], [completion], finished=finish_reason is not None)


def test_request_trace_records_latencies_once(recorded, monkeypatch):
    clock = iter([10.5, 11.5])  # when the first token came, then the third
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    trace = RequestTrace(start_s=10.0, role="decode", replica="d1")
    trace.on_output(output(1))
    trace.on_output(output(1))
    trace.on_output(output(3, "length"))
    trace.record(RequestStatus.LENGTH)
    tags = {"role": "decode", "replica": "d1"}
    assert recorded.ttft.calls == [(0.5, tags)]
    assert recorded.tpot.calls == [(0.5, tags)]  # (11.5 - 10.5) / 2 gaps
    assert recorded.e2e.calls == [(1.5, tags)]
    assert recorded.requests.calls == [(1, {**tags, "status": "length"})]
    assert recorded.span.calls == []  # not a PD request: no spans


def test_a_pd_request_records_its_spans_and_hands_them_to_the_client(recorded, monkeypatch):
    clock = iter([10.02, 10.5, 10.6])  # reserved, first token (prefill), second token (decode)
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    trace = RequestTrace(start_s=10.0, role="decode", replica="d1")
    trace.mark(metrics.Span.RESERVED)
    first = output(1)
    first.metrics = {"queue_s": 0.01, "ttft_s": 0.3}
    trace.observe("prefill", first)
    trace.on_output(first)
    admitted = output(1)
    admitted.metrics = {"ttft_s": 0.4}
    trace.observe("decode", admitted)
    final = output(2, "length")
    trace.on_output(final)
    trace.record(RequestStatus.LENGTH)
    spans = {
        "reserved": 0.02, "first_token": 0.5, "second_token": 0.6, "prefill_queue": 0.01,
        "prefill_first_token": 0.3, "decode_admitted": 0.4,
    }  # fmt: skip
    got = {tags["span"]: value for value, tags in recorded.span.calls}
    assert got == pytest.approx(spans)
    assert {k[5:]: v for k, v in final.metrics.items() if k.startswith("span:")} == pytest.approx(
        spans
    )


def test_a_request_without_tokens_counts_only_its_status(recorded):
    RequestTrace().record(RequestStatus.NO_CAPACITY)
    assert recorded.ttft.calls == recorded.tpot.calls == recorded.e2e.calls == []
    assert recorded.requests.calls == [(1, {"role": "", "replica": "", "status": "no_capacity"})]


def test_routing_decisions(recorded):
    record_routing("prefill", "p1", RoutingOutcome.PICKED)
    record_routing("decode", "", RoutingOutcome.NO_INSTANCE)
    assert recorded.routing.calls == [
        (1, {"role": "prefill", "replica": "p1", "outcome": "picked"}),
        (1, {"role": "decode", "replica": "", "outcome": "no_instance"}),
    ]


def test_replica_gauges_and_transfer_deltas(recorded):
    transfer = TransferMetrics(bytes_received=100, completed=1, transfer_time_s=0.25)
    replica = ReplicaMetrics("decode", "d1", transfer)
    record = InstanceRecord(
        instance_id="d1", role=Role.DECODE, running_requests=3, waiting_requests=2,
        free_kv_blocks=30, total_kv_blocks=40,
    )  # fmt: skip
    replica.update(record)
    tags = {"role": "decode", "replica": "d1"}
    assert recorded.running.calls == [(3, tags)] and recorded.waiting.calls == [(2, tags)]
    assert recorded.kv_usage.calls == [(0.25, tags)]
    assert recorded.kv_bytes.calls == [(100, tags)]
    replica.update(record)  # nothing new: no increments
    transfer.bytes_received, transfer.expired_leases = 160, 1
    replica.update(record)
    assert recorded.kv_bytes.calls == [(100, tags), (60, tags)]
    assert recorded.kv_completed.calls == [(1, tags)]
    assert recorded.kv_seconds.calls == [(0.25, tags)]
    assert recorded.kv_expired.calls == [(1, tags)]
    assert recorded.kv_failures.calls == []
