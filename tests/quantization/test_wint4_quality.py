"""pdray.bench.quality: its figures from scores, and one small run on a tiny checkpoint."""

from __future__ import annotations

import pytest

from pdray.bench import quality
from pdray.bench.quality import PositionScore, compare


def test_figures_from_scores():
    reference = [[PositionScore(5, -0.5, 1), PositionScore(7, -1.0, 1)]]
    scores = [[PositionScore(5, -0.7, 1), PositionScore(9, -1.6, 2)]]
    figures = compare("asymmetric", reference, scores)
    assert figures.positions == 2
    assert figures.top1_agreement == 0.5 and figures.greedy_token_top1 == 0.5
    assert figures.mean_abs_logprob_diff == pytest.approx(0.4)
    assert figures.max_abs_logprob_diff == pytest.approx(0.6)
    assert figures.mean_logprob == pytest.approx(-1.15)


def test_quality_run_on_a_tiny_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "quality.json"
    result = quality.main([
        "--model", str(checkpoint("llama3")), "--device", "cpu", "--dtype", "float32",
        "--num-prompts", "2", "--prompt-len", "8", "--max-tokens", "6", "--out", str(out),
    ])  # fmt: skip
    assert out.is_file()
    rows = {f["scheme"]: f for f in result["figures"]}
    assert set(rows) == {"unquantized", "asymmetric", "symmetric", "asymmetric+lm_head"}
    assert rows["unquantized"]["greedy_token_top1"] == 1.0  # its own greedy tokens
    assert rows["unquantized"]["mean_abs_logprob_diff"] == 0.0
    for scheme in ("asymmetric", "symmetric", "asymmetric+lm_head"):
        assert rows[scheme]["positions"] == 12
        assert rows[scheme]["mean_abs_logprob_diff"] > 0  # the weights did change
