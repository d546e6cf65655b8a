"""PNG plots of serving benchmark results, drawn from the result JSON's keys.

matplotlib is optional (`pip install 'pdray[bench]'`) and imported only here, when plotting; the
figures are rendered with the Agg canvas directly, so pyplot's global state is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdray.bench.serve_metrics import Metric, latency_samples_s, results_from_lists

TITLES = {
    Metric.TTFT: "TTFT (time to first token)",
    Metric.TPOT: "TPOT (time per output token)",
    Metric.ITL: "ITL (inter-token latency)",
    Metric.E2EL: "E2E latency",
}


def require_matplotlib() -> None:
    """Fail early, before a run, when plots are wanted and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install 'pdray[bench]' (or pass --no-plots)"
        ) from e


def _figure(num_cols: int, num_rows: int = 1):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * num_cols, 4 * num_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(num_rows, num_cols, squeeze=False).ravel()


def plot_latency_cdfs(
    result: dict[str, Any], path: str | Path, slos_ms: dict[Metric, float] | None = None
) -> Path:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E of the completed requests, one panel each,
    with a dashed line at each goodput SLO."""
    samples = latency_samples_s(results_from_lists(result))
    fig, axes = _figure(2, 2)
    for ax, metric in zip(axes, Metric, strict=True):
        values_ms = np.sort(np.asarray(samples[metric], dtype=float) * 1000)
        if values_ms.size:
            fraction = np.arange(values_ms.size + 1) / values_ms.size  # 0 before the smallest
            ax.step(np.concatenate([values_ms[:1], values_ms]), fraction, where="post")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
        if slos_ms and metric in slos_ms:
            ax.axvline(slos_ms[metric], color="red", linestyle="--", label="SLO")
            ax.legend(loc="lower right")
        ax.set_title(f"{TITLES[metric]}, n={values_ms.size}")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    rate = result.get("request_rate", "inf")
    fig.suptitle(f"{result.get('model_id', '')} at {rate} req/s: latency CDFs")
    fig.savefig(path, dpi=100)
    return Path(path)


def _rate_label(rate: Any) -> str:
    return "inf" if rate == "inf" or rate == float("inf") else f"{float(rate):g}"


def plot_sweep(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """p99 TTFT, p99 ITL, and request goodput and throughput against the request rate (one
    point per run; the rates are evenly spaced categories, so `inf` has a place)."""
    rates = [_rate_label(r.get("request_rate", "inf")) for r in results]
    x = np.arange(len(results))
    fig, axes = _figure(3)
    for ax, metric in zip(axes, (Metric.TTFT, Metric.ITL), strict=False):
        p99_ms = []
        for result in results:
            values = latency_samples_s(results_from_lists(result))[metric]
            p99_ms.append(float(np.percentile(values, 99)) * 1000 if values else np.nan)
        ax.plot(x, p99_ms, marker="o")
        ax.set_title(f"p99 {TITLES[metric]}")
        ax.set_ylabel("ms")
    ax = axes[2]
    ax.plot(x, [r["request_throughput"] for r in results], marker="o", label="throughput")
    if any(r.get("request_goodput") is not None for r in results):
        goodput = [r.get("request_goodput") or 0.0 for r in results]
        ax.plot(x, goodput, marker="s", label="goodput (all SLOs met)")
    ax.set_title("completed requests per second")
    ax.set_ylabel("req/s")
    ax.legend()
    for ax in axes:
        ax.set_xticks(x, rates)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results[0].get('model_id', '')}: request-rate sweep")
    fig.savefig(path, dpi=100)
    return Path(path)
