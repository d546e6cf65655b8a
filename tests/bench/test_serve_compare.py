"""serve_compare: two sweeps side by side (markdown table, overlay plot)."""

from __future__ import annotations

import json

import pytest

from pdray.bench import serve_compare


def sweep(label: str, ttft_p99: float) -> list[dict]:
    keys = {k: 1.0 for _, k, _ in serve_compare.COLUMNS}
    return [
        {**keys, "label": label, "request_rate": rate, "p99_ttft_ms": ttft_p99 * rate, "failed": 0}
        for rate in (2.0, 8.0)
    ]


def test_table_and_plot(tmp_path):
    paths = []
    for label, ttft in (("1p1d", 10.0), ("mixed", 30.0)):
        paths.append(tmp_path / f"{label}-sweep.json")
        paths[-1].write_text(json.dumps(sweep(label, ttft)))
    text = serve_compare.main([*map(str, paths), "--plot", str(tmp_path / "c.png")])
    rows = text.splitlines()[2:]
    assert [r.split("|")[1:3] for r in rows] == [
        [" 2 ", " 1p1d "], [" 2 ", " mixed "], [" 8 ", " 1p1d "], [" 8 ", " mixed "]
    ]  # fmt: skip
    assert "| 8 | mixed | 1.0 | 240.0 |" in text
    assert (tmp_path / "c.png").stat().st_size > 0


def test_not_a_sweep_is_refused(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"request_rate": 1}))
    with pytest.raises(ValueError, match="not a sweep"):
        serve_compare.main([str(path)])
