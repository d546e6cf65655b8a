"""pdray.bench.engine with --tensor-parallel-size: the argument checks, `--compare` on hand-written
reports, and the tensor-parallel decode path on CPU (two ranks over gloo)."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from pdray.bench import engine
from pdray.config import EngineConfig
from pdray.worker.model_runner import ModelRunner


def test_tensor_parallel_size_defaults_to_one():
    assert engine.parse_args([]).tensor_parallel_size == 1
    assert engine.parse_args(["--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    assert engine.parse_args(["--profile", "--no-fused-ops"]).profile  # fine on one GPU


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tensor-parallel-size", "2", "--profile"], "--profile needs --tensor-parallel-size 1"),
        (["--tensor-parallel-size", "2", "--no-fused-ops"], "--no-fused-ops needs"),
        (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1"),
    ],
)
def test_flags_that_cannot_run_tensor_parallel_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        engine.main(flags)
    assert exit_info.value.code == 2  # argparse's usage error, before any GPU work
    assert message in capsys.readouterr().err


def _report(tp: int, execute_ms: dict[int, float], **overrides) -> dict:
    rows = [{"batch": b, "context_len": 2048, "execute_ms": ms} for b, ms in execute_ms.items()]
    report = {
        "gpu": "NVIDIA H200",
        "model": "dummy:llama3-8b",
        "dtype": "torch.bfloat16",
        "fused_ops": True,
        "tensor_parallel_size": tp,
        "decode": rows,
    }
    return {**report, **overrides}


def _write(path, report: dict) -> str:
    path.write_text(json.dumps(report))
    return str(path)


def test_compare_prints_the_ratio_per_shared_batch_size(tmp_path, capsys):
    tp1 = _write(tmp_path / "tp1.json", _report(1, {1: 5.0, 16: 6.0, 64: 8.0}))
    tp2 = _write(tmp_path / "tp2.json", _report(2, {1: 3.5, 64: 5.0, 256: 9.0}))

    result = engine.main(["--compare", tp1, tp2])  # no GPU needed

    assert [(r["batch"], r["context_len"]) for r in result["decode"]] == [(1, 2048), (64, 2048)]
    assert [r["ratio"] for r in result["decode"]] == pytest.approx([0.7, 0.625])
    assert result["base_tensor_parallel_size"] == 1
    assert result["other_tensor_parallel_size"] == 2
    out = capsys.readouterr().out
    assert "batch    1 ctx 2048: TP2 3.500 ms / TP1 5.000 ms = 0.700" in out
    assert "batch   64 ctx 2048: TP2 5.000 ms / TP1 8.000 ms = 0.625" in out
    assert "different GPUs" not in out


def test_compare_prints_the_prefill_ratio_per_shared_prompt_length(tmp_path, capsys):
    prefill = {8192: 400.0, 1024: 40.0}
    tp1 = _write(tmp_path / "tp1.json", _report(1, {1: 5.0}, prefill=[
        {"prompt_len": n, "ms": ms} for n, ms in prefill.items()]))  # fmt: skip
    tp2 = _write(tmp_path / "tp2.json", _report(2, {1: 3.5}, prefill=[
        {"prompt_len": 8192, "ms": 220.0}]))  # fmt: skip

    result = engine.main(["--compare", tp1, tp2])

    assert [(r["prompt_len"], r["ratio"]) for r in result["prefill"]] == [(8192, 0.55)]
    assert "prefill  8192 tokens: TP2 220.00 ms / TP1 400.00 ms = 0.550" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (_report(2, {1: 3.5}, model="dummy:llama3.2-1b"), "differ in model"),
        (_report(2, {1: 3.5}, dtype="torch.float16"), "differ in dtype"),
        (
            _report(2, {1: 3.5}, decode=[{"batch": 1, "context_len": 2048, "step_ms": 3.5}]),
            "no 'execute_ms'",
        ),  # fmt: skip
        (
            _report(2, {1: 3.5}, decode=[{"batch": 1, "context_len": 4096, "execute_ms": 3.5}]),
            "share no decode batch size",
        ),  # fmt: skip
    ],
)
def test_compare_refuses_reports_that_do_not_match(tmp_path, other, message):
    tp1 = _write(tmp_path / "tp1.json", _report(1, {1: 5.0}))
    tp2 = _write(tmp_path / "tp2.json", other)
    with pytest.raises(SystemExit, match=message):
        engine.main(["--compare", tp1, tp2])


def test_compare_of_a_missing_report_exits_with_its_path(tmp_path):
    tp1 = _write(tmp_path / "tp1.json", _report(1, {1: 5.0}))
    with pytest.raises(SystemExit, match="missing.json"):
        engine.main(["--compare", tp1, str(tmp_path / "missing.json")])


class KVProbe:
    """Made on each follower by `tp_group.create`: reads that rank's KV cache."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def std(self) -> float:
        return float(self.runner.kv_cache.float().std())


def _cpu_wall_median_ms(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def test_tensor_parallel_decode_runs_through_execute_on_every_rank(monkeypatch):
    """Two ranks on CPU: the KV fill reaches the follower, and bench_decode_tp's steps (through
    runner.execute, which the follower joins) complete. CPU wall times, so only rows are checked."""
    monkeypatch.setattr(engine, "wall_median_ms", _cpu_wall_median_ms)  # timing's syncs need CUDA
    config = EngineConfig(
        model="dummy:tiny", device="cpu", dtype="float32", tensor_parallel_size=2,
        max_num_seqs=4, max_model_len=64, max_num_batched_tokens=64,
    )  # fmt: skip
    runner = ModelRunner(config)
    try:
        runner.allocate_kv_cache(16, max_model_len=64)
        runner.tp_group.create("probe", KVProbe)
        assert runner.tp_group.call("std", target="probe") == [0.0]
        runner.tp_group.create("bench_fill_kv", engine.fill_kv_cache_normal)
        engine.fill_kv_cache_normal(runner)
        assert runner.tp_group.call("std", target="probe")[0] == pytest.approx(1.0, abs=0.1)
        counts = engine.model_counts(runner)
        rows = engine.bench_decode_tp(runner, counts, [1, 4], 32, read_gbps=1.0, iters=2)
    finally:
        runner.close()
    # dummy:tiny over 2 ranks: rank 0 holds 4 of 8 heads, 1 of 2 KV heads, half the vocab
    head_dim = 256 // 8
    assert counts["attn_width"] == 4 * head_dim
    assert counts["kv_bytes_per_token"] == 2 * 4 * 1 * head_dim * 4  # K and V, 4 layers, fp32
    assert counts["lm_head_params"] == 2048 * 256
    assert [(r["batch"], r["context_len"]) for r in rows] == [(1, 32), (4, 32)]
    assert all(r["graph_batch"] is None for r in rows)  # no CUDA graphs on CPU: eager steps
    assert all(r["execute_ms"] > 0 and r["bound_fraction"] > 0 for r in rows)


def test_engine_decode_steps_equal_the_batch_that_carries_its_tables():
    """The bench's decode steps as the engine sends them (rows of the persistent device tables:
    written once, then only row ids) sample what the same batch with its own tables samples."""
    config = EngineConfig(
        model="dummy:tiny", device="cpu", dtype="float32", max_num_seqs=4, max_model_len=64,
        max_num_batched_tokens=64,
    )  # fmt: skip
    runner = ModelRunner(config)
    try:
        runner.allocate_kv_cache(16, max_model_len=64)
        engine.fill_kv_cache_normal(runner)
        batch = engine.decode_batch(4, 32, config.block_size)
        first, steady = engine.engine_decode_steps(batch)
        assert not steady.block_tables and not steady.table_writes and steady.table_rows
        want = [t.token_id for t in runner.execute(batch)]
        assert [t.token_id for t in runner.execute(first)] == want
        assert [t.token_id for t in runner.execute(steady)] == want
    finally:
        runner.close()
