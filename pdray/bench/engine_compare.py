"""`python -m pdray.bench.engine --compare BASE.json OTHER.json`: decode step times of two engine
benchmark reports side by side (e.g. a TP=2 run over a TP=1 run of the same model); no GPU needed.
"""

from __future__ import annotations

import json


def compare_reports(base: dict, other: dict, field: str = "execute_ms") -> list[dict]:
    """Decode `field` of two reports side by side, per (batch, context_len) both measured:
    base_ms, other_ms and ratio = other_ms / base_ms (e.g. TP2 step time / TP1 step time)."""
    for key in ("model", "dtype", "fused_ops"):
        if base.get(key) != other.get(key):
            raise ValueError(
                f"the reports differ in {key}: {base.get(key)!r} vs {other.get(key)!r}"
            )

    def rows_by_shape(report: dict, name: str) -> dict[tuple[int, int], float]:
        rows = {}
        for row in report.get("decode", []):
            if field not in row:
                raise ValueError(
                    f"{name}'s decode rows have no {field!r} (a report from before "
                    "--tensor-parallel-size? run it again)"
                )
            rows[(row["batch"], row["context_len"])] = row[field]
        return rows

    base_rows, other_rows = rows_by_shape(base, "BASE"), rows_by_shape(other, "OTHER")
    shared = sorted(base_rows.keys() & other_rows.keys())
    if not shared:
        raise ValueError("the reports share no decode batch size at the same context length")
    return [
        {
            "batch": batch,
            "context_len": context_len,
            "base_ms": base_rows[batch, context_len],
            "other_ms": other_rows[batch, context_len],
            "ratio": other_rows[batch, context_len] / base_rows[batch, context_len],
        }
        for batch, context_len in shared
    ]


def compare_prefill(base: dict, other: dict) -> list[dict]:
    """Prefill ms of two reports per prompt length both measured, with ratio = other / base."""
    base_ms = {r["prompt_len"]: r["ms"] for r in base.get("prefill", [])}
    other_ms = {r["prompt_len"]: r["ms"] for r in other.get("prefill", [])}
    return [
        {"prompt_len": n, "base_ms": base_ms[n], "other_ms": other_ms[n],
         "ratio": other_ms[n] / base_ms[n]}
        for n in sorted(base_ms.keys() & other_ms.keys())
    ]  # fmt: skip


def run_compare(base_path: str, other_path: str) -> dict:
    """`--compare`: read two saved reports and print their decode execute_ms ratios."""
    reports = []
    for path in (base_path, other_path):
        with open(path) as f:
            reports.append(json.load(f))
    base, other = reports
    rows = compare_reports(base, other)
    tp_base = base.get("tensor_parallel_size", 1)
    tp_other = other.get("tensor_parallel_size", 1)
    print(f"{base.get('model')}: decode execute_ms of {other_path} (TP{tp_other}) / "
          f"{base_path} (TP{tp_base})")  # fmt: skip
    for r in rows:
        print(f"  batch {r['batch']:4d} ctx {r['context_len']}: TP{tp_other} {r['other_ms']:.3f} "
              f"ms / TP{tp_base} {r['base_ms']:.3f} ms = {r['ratio']:.3f}")  # fmt: skip
    prefill = compare_prefill(base, other)
    for r in prefill:
        print(f"  prefill {r['prompt_len']:5d} tokens: TP{tp_other} {r['other_ms']:.2f} ms / "
              f"TP{tp_base} {r['base_ms']:.2f} ms = {r['ratio']:.3f}")  # fmt: skip
    if base.get("gpu") != other.get("gpu"):
        print(f"note: different GPUs ({base.get('gpu')!r} vs {other.get('gpu')!r})")
    return {
        "base": base_path,
        "other": other_path,
        "base_tensor_parallel_size": tp_base,
        "other_tensor_parallel_size": tp_other,
        "field": "execute_ms",
        "decode": rows,
        "prefill": prefill,
    }
