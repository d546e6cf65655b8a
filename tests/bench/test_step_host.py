"""The decode-step host benchmark runs on CPU and reports every part of a step."""

from __future__ import annotations

from pdray.bench.step_host import main


def test_step_host_reports_each_part(tmp_path):
    out = tmp_path / "step_host.json"
    rows = main(["--batch-sizes", "1", "3", "--context-len", "96", "--iters", "3", "--warmup", "1",
                 "--out", str(out)])  # fmt: skip
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        parts = ("schedule", "build", "runner", "sampler", "step", "pickle", "graph_stage")
        assert all(row[k] > 0 for k in parts), row
        assert row["runner"] < row["step"] and row["sampler"] < row["runner"]
        assert row["context_len"] <= 96
    assert out.exists()
