"""Metrics of the serving benchmark, from per-request client-side timelines.

Per request (seconds from sending the request, measured by the client):
  TTFT = arrival of the first chunk with non-empty text;
  ITL  = gaps between consecutive chunks with non-empty text (one per chunk after the first);
  E2E  = arrival of the last chunk with non-empty text;
  TPOT = (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
Aggregates over the completed requests: throughput = count / the run's wall time; mean, median,
std (population) and percentiles (linear interpolation) of TTFT, TPOT, E2E, and of all ITLs pooled.
Goodput (DistServe): completed requests meeting every given SLO, per second of wall time; a request
with one output token has TPOT 0 for that test.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Metric(str, enum.Enum):
    TTFT = "ttft"
    TPOT = "tpot"
    ITL = "itl"
    E2EL = "e2el"


# Metrics a goodput SLO can be set on (ITL is a per-gap value, not a per-request one).
SLO_METRICS = (Metric.TTFT, Metric.TPOT, Metric.E2EL)


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one request."""

    success: bool = False
    prompt_len: int = 0  # the server's usage.prompt_tokens, else the dataset's length
    output_tokens: int = 0  # the server's usage.completion_tokens, else the chunks with text
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0  # E2E
    generated_text: str = ""
    error: str = ""
    spans_s: dict[str, float] = field(default_factory=dict)  # a PD server's usage.pdray_spans_s

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def parse_goodput(items: Iterable[str] | None) -> dict[Metric, float]:
    """["ttft:200", "tpot:50"] -> {TTFT: 200.0, TPOT: 50.0} (milliseconds)."""
    slos: dict[Metric, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        names = ", ".join(m.value for m in SLO_METRICS)
        try:
            metric = Metric(name.strip().lower())
            slo_ms = float(value)
        except ValueError:
            metric, slo_ms = None, -1.0
        if not sep or metric not in SLO_METRICS or not slo_ms >= 0:
            raise ValueError(
                f"--goodput takes NAME:MILLISECONDS with NAME one of {names} and a value >= 0, "
                f"got {item!r}"
            )
        slos[metric] = slo_ms
    return slos


def parse_percentiles(text: str) -> list[float]:
    """ "90,99" -> [90.0, 99.0]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < p < 100 for p in values):
        raise ValueError(f"--metric-percentiles takes numbers in (0, 100) like 90,99, got {text!r}")
    return values


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if p == int(p) else f"p{p:g}"


def meets_slos(result: RequestResult, slos_ms: dict[Metric, float]) -> bool:
    values_s = {
        Metric.TTFT: result.ttft_s,
        Metric.TPOT: result.tpot_s,
        Metric.E2EL: result.latency_s,
    }
    return all(values_s[metric] * 1000 <= slo_ms for metric, slo_ms in slos_ms.items())


def latency_samples_s(results: Sequence[RequestResult]) -> dict[Metric, list[float]]:
    """The samples each latency statistic is taken over (completed requests only)."""
    done = [r for r in results if r.success]
    return {
        Metric.TTFT: [r.ttft_s for r in done],
        Metric.TPOT: [r.tpot_s for r in done if r.output_tokens > 1],
        Metric.ITL: [gap for r in done for gap in r.itl_s],
        Metric.E2EL: [r.latency_s for r in done],
    }


def calculate_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    *,
    percentiles: Sequence[float] = (90, 99),
    goodput_slos_ms: dict[Metric, float] | None = None,
    metrics: Sequence[Metric] = tuple(Metric),
) -> dict[str, Any]:
    """The aggregate keys of the result JSON (vLLM's names); statistics of an empty sample are 0."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    if goodput_slos_ms:
        good = sum(meets_slos(r, goodput_slos_ms) for r in done)
        out["request_goodput"] = good / duration_s
    samples = latency_samples_s(results)
    for metric in metrics:
        values_ms = np.asarray(samples[metric], dtype=float) * 1000
        empty = values_ms.size == 0
        out[f"mean_{metric.value}_ms"] = 0.0 if empty else float(values_ms.mean())
        out[f"median_{metric.value}_ms"] = 0.0 if empty else float(np.median(values_ms))
        out[f"std_{metric.value}_ms"] = 0.0 if empty else float(values_ms.std())
        for p in percentiles:
            value = 0.0 if empty else float(np.percentile(values_ms, p))
            out[f"{percentile_key(p)}_{metric.value}_ms"] = value
    return out


def per_request_lists(results: Sequence[RequestResult]) -> dict[str, list]:
    """The per-request keys of the result JSON, in request order (failed requests: zeros)."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft_s for r in results],
        "itls": [r.itl_s for r in results],
        "e2els": [r.latency_s for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }


def results_from_lists(lists: dict[str, Any]) -> list[RequestResult]:
    """Rebuild the per-request results from a result JSON's per-request keys."""
    return [
        RequestResult(
            success=not error,
            prompt_len=prompt_len,
            output_tokens=output_len,
            ttft_s=ttft_s,
            itl_s=list(itl_s),
            latency_s=e2el_s,
            error=error,
        )
        for prompt_len, output_len, ttft_s, itl_s, e2el_s, error in zip(
            lists["input_lens"],
            lists["output_lens"],
            lists["ttfts"],
            lists["itls"],
            lists["e2els"],
            lists["errors"],
            strict=True,
        )
    ]


def span_breakdown(results: list[RequestResult]) -> dict[str, dict[str, float]]:
    """Median and p99 (ms) of each span a PD server reported (usage.pdray_spans_s), over the
    successful requests that reported it; {} for servers that report none."""
    by_span: dict[str, list[float]] = {}
    for r in results:
        if r.success:
            for span, value_s in r.spans_s.items():
                by_span.setdefault(span, []).append(value_s * 1000)
    return {
        span: {
            "count": len(values),
            "median_ms": float(np.median(values)),
            "p99_ms": float(np.percentile(values, 99)),
        }
        for span, values in sorted(by_span.items(), key=lambda kv: np.median(kv[1]))
    }
