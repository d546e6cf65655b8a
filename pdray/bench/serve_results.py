"""Output of the serving benchmark: the printed table, the result JSON files and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdray.bench.serve_metrics import Metric, per_request_lists, percentile_key

SECTION_TITLES = {
    Metric.TTFT: "Time to First Token",
    Metric.TPOT: "Time per Output Token (excl. 1st token)",
    Metric.ITL: "Inter-token Latency",
    Metric.E2EL: "End-to-end Latency",
}


def print_result(
    result: dict[str, Any],
    metrics: list[Metric],
    percentiles: list[float],
    breakdown: bool = False,
) -> None:
    rows: list[tuple[str, Any]] = [
        ("Successful requests", result["completed"]),
        ("Failed requests", result["failed"]),
        ("Request rate (req/s)", result["request_rate"]),
        ("Maximum request concurrency", result["max_concurrency"]),
        ("Benchmark duration (s)", result["duration"]),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", result["request_throughput"]),
    ]
    if result["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", result["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", result["output_throughput"]),
        ("Total token throughput (tok/s)", result["total_token_throughput"]),
    ]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{name + ':':<40} {_fmt(value)}" for name, value in rows]
    for metric in metrics:
        m, name = metric.value, metric.value.upper()
        lines.append("{s:{c}^50}".format(s=SECTION_TITLES[metric], c="-"))
        for stat in ["mean", "median", "std", *map(percentile_key, percentiles)]:
            lines.append(
                f"{f'{stat.capitalize()} {name} (ms):':<40} {_fmt(result[f'{stat}_{m}_ms'])}"
            )
    lines += _breakdown_lines(result.get("span_breakdown") or {}) if breakdown else []
    lines.append("=" * 50)
    errors = sorted({e for e in result["errors"] if e})
    if errors:
        lines.append(f"{len(errors)} distinct error(s), e.g.: {errors[0]}")
    print("\n".join(lines), flush=True)


def _breakdown_lines(spans: dict[str, dict[str, float]]) -> list[str]:
    """Where time to first token goes (a PD server's spans: deployments/metrics.Span)."""
    lines = ["{s:{c}^50}".format(s="TTFT breakdown (PD spans, ms)", c="-")]
    if not spans:
        return [*lines, "(the server reported no spans: not a PD deployment)"]
    lines.append(f"{'span':<24} {'median':>8} {'p99':>8} {'count':>6}")
    for span, s in spans.items():
        lines.append(f"{span:<24} {s['median_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['count']:>6}")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _rate_name(rate: float | str) -> str:
    return rate if isinstance(rate, str) else f"{rate:g}"


def save_results(
    results: list[dict[str, Any]],
    *,
    result_dir: str | Path,
    result_filename: str | None,
    label: str,
    slos_ms: dict[Metric, float],
    plots: bool,
) -> list[Path]:
    """Write each run's JSON (and CDF plot); for a sweep, a summary JSON and the sweep plot.

    Names: `result_filename` as given for one run; otherwise `<stem>-<rate>qps[-concurrencyN]`,
    the stem being `result_filename`'s or `<label>-<date>`; a sweep adds `<stem>-sweep.*`.
    `result_filename` is joined to `result_dir` as `vllm bench serve` does: an absolute path or
    one with folders is honoured (an absolute one ignores `result_dir`).
    """
    if result_filename:
        target = Path(result_dir) / result_filename
        directory, stem = target.parent, target.stem
    else:
        directory, stem = Path(result_dir), f"{label}-{results[0]['date']}"
    directory.mkdir(parents=True, exist_ok=True)
    sweep = len(results) > 1
    written = []
    for result in results:
        name = stem
        if sweep or not result_filename:
            name += f"-{_rate_name(result['request_rate'])}qps"
            if result["max_concurrency"]:
                name += f"-concurrency{result['max_concurrency']}"
        written.append(directory / f"{name}.json")
        written[-1].write_text(json.dumps(result, indent=2) + "\n")
        if plots:
            from pdray.bench.serve_plots import plot_latency_cdfs

            written.append(
                plot_latency_cdfs(result, directory / f"{name}-latency-cdf.png", slos_ms)
            )
    if sweep:
        per_request = set(per_request_lists([]))
        summary = [{k: v for k, v in r.items() if k not in per_request} for r in results]
        written.append(directory / f"{stem}-sweep.json")
        written[-1].write_text(json.dumps(summary, indent=2) + "\n")
        if plots:
            from pdray.bench.serve_plots import plot_sweep

            written.append(plot_sweep(results, directory / f"{stem}-sweep.png"))
    for path in written:
        print(f"Saved {path}")
    return written
