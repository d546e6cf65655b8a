"""Compare request-rate sweeps of several deployments: a markdown table and one overlay plot.

    python -m pdray.bench.serve_compare out/1p1d-sweep.json out/mixed-sweep.json \
        --plot out/compare.png > out/compare.md

Each sweep is the `<label>-sweep.json` that `python -m pdray.bench.serve --request-rates ...
--save-result` writes. Per rate and deployment the table gives TTFT and ITL p50/p99, TPOT p50,
request throughput and goodput (the SLOs the sweep ran with); the plot puts p99 TTFT, p99 ITL and
goodput of every deployment on shared axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pdray.bench.serve_plots import _figure, _rate_label

COLUMNS = [  # (header, result key, format)
    ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("ITL p50 ms", "median_itl_ms", "{:.2f}"),
    ("ITL p99 ms", "p99_itl_ms", "{:.2f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.2f}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("goodput req/s", "request_goodput", "{:.2f}"),
    ("failed", "failed", "{}"),
]


def load(path: str | Path) -> list[dict[str, Any]]:
    runs = json.loads(Path(path).read_text())
    if not isinstance(runs, list) or not runs or "request_rate" not in runs[0]:
        raise ValueError(f"{path}: not a sweep written by `pdray.bench.serve --request-rates`")
    return runs


def table(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per (rate, deployment), rates in the order of the first sweep."""
    lines = ["| rate req/s | deployment | " + " | ".join(h for h, _, _ in COLUMNS) + " |"]
    lines.append("|" + "---|" * (2 + len(COLUMNS)))
    rates = [_rate_label(r["request_rate"]) for r in next(iter(sweeps.values()))]
    for rate in rates:
        for label, runs in sweeps.items():
            run = next((r for r in runs if _rate_label(r["request_rate"]) == rate), None)
            if run is None:
                continue
            cells = [
                "-" if run.get(key) is None else fmt.format(run[key]) for _, key, fmt in COLUMNS
            ]
            lines.append(f"| {rate} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(sweeps: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    fig, axes = _figure(3)
    panels = [("p99_ttft_ms", "p99 TTFT", "ms"), ("p99_itl_ms", "p99 ITL", "ms"),
              ("request_goodput", "goodput (all SLOs met)", "req/s")]  # fmt: skip
    for ax, (key, title, unit) in zip(axes, panels, strict=True):
        for label, runs in sweeps.items():
            rates = [float(r["request_rate"]) for r in runs]
            ax.plot(rates, [r.get(key) or 0.0 for r in runs], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    return Path(path)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", help="<label>-sweep.json files")
    parser.add_argument("--plot", help="write the overlay plot here (PNG)")
    args = parser.parse_args(argv)
    sweeps = {}
    for path in args.sweeps:
        runs = load(path)
        sweeps[runs[0].get("label") or Path(path).stem.removesuffix("-sweep")] = runs
    text = table(sweeps)
    print(text)
    if args.plot:
        plot(sweeps, args.plot)
    return text


if __name__ == "__main__":
    main()
