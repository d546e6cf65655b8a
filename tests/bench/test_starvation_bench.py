"""The starvation benchmark end to end on CPU (dummy:tiny): it measures idle and loaded TTFT of
short requests while one large-n request decodes, and records whether the load lasted. Timing is
reported, never asserted (benchmarks, not timed tests)."""

from __future__ import annotations

import json

import pytest

from pdray.bench import starvation


def test_summary_ratio_and_target():
    result = starvation.summarize([0.010, 0.012, 0.011], [0.020, 0.030, 0.025], 5)
    assert result["ratio_median"] == pytest.approx(25 / 11)
    assert result["met"] is False and result["big_tokens_left_at_end"] == 5
    assert starvation.summarize([0.01], [0.015], 1)["met"] is True


def test_runs_on_cpu_and_writes_its_result(tmp_path):
    out = tmp_path / "starvation.json"
    result = starvation.main([
        "--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--big-n", "4",
        "--big-max-tokens", "400", "--short-len", "16", "--trials", "2", "--gap-s", "0",
        "--max-num-seqs", "8", "--out", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text())["ratio_median"] == result["ratio_median"] > 0
    assert result["big_tokens_left_at_end"] > 0  # the load lasted through every trial
    assert result["idle_ttft_ms"]["median"] > 0 and result["loaded_ttft_ms"]["median"] > 0
