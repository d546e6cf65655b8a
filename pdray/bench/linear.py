"""Linear-layer benchmark: cuBLAS, the decode GEMV and the int4 kernels on Llama-3-8B's shapes.

    python -m pdray.bench.linear --out linear.json
    python -m pdray.bench.linear --tune --out linear_tune.json   # block-size sweep

On the GPU it runs on it measures HBM read bandwidth (kernels/bandwidth.py) and the bf16 matmul rate
(pdray.bench.engine), then times, for qkv 6144x4096, o 4096x4096, gate_up 28672x4096,
down 4096x14336 and the bf16 LM head 128256x4096:
- decode (M = 1, 2, 4, 8, 16, 64): `F.linear` (cuBLAS) and `kernels.gemv.linear` in bf16 and
  `kernels.int4_gemm.int4_linear` (group 128); each call inside a CUDA graph that runs it over
  enough copies of the weight that nothing is served from L2, timed by `do_bench_cudagraph`
  (median). Fraction of bandwidth = bytes read (weight, int4 scales and zeros, x, out) / time /
  bandwidth. `model_*` rows add up 32 layers and the LM head: a batch-M step's linear layers
  against (their bytes) / bandwidth, the issue's decode bound without attention.
- prefill (M = 8192): cuBLAS bf16 against int4_linear (both paths), as a fraction of the matmul
  rate (2 M N K / time / rate) and int4 speed / bf16 speed.
`--tune` sweeps the kernels' block sizes at the decode M values instead and prints, per kernel and
M, each config's model-step fraction of bandwidth, best first.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LM_HEAD = (128256, 4096)
NUM_LAYERS = 32
GROUP_SIZE = 128
_ROTATE_BYTES = 512 << 20  # weight copies per graph: several times any L2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decode-m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--prefill-m", type=int, nargs="+", default=[8192])
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench time per case")
    parser.add_argument("--tune", action="store_true", help="sweep block sizes instead")
    parser.add_argument(
        "--tune-kernels",
        nargs="+",
        default=["gemv", "int4_gemv", "int4_gemm"],
        choices=["gemv", "int4_gemv", "int4_gemm"],
        help="what --tune sweeps",
    )
    parser.add_argument("--out", default="bench_linear.json")
    args = parser.parse_args(argv)
    for m in [*args.decode_m, *args.prefill_m]:
        if m < 1:
            parser.error(f"M must be at least 1, not {m}")
    if args.rep_ms <= 0:
        parser.error("--rep-ms must be positive")
    return args


def weight_bytes(n: int, k: int, int4: bool, group_size: int = GROUP_SIZE) -> int:
    """Bytes of a [N, K] bf16 weight, or of its int4 codes plus bf16 scales and zeros."""
    if int4:
        return n * k // 2 + 2 * n * (k // group_size) * 2
    return n * k * 2


def read_bytes(m: int, n: int, k: int, int4: bool) -> int:
    """Bytes one call moves: the weight, x [M, K] and out [M, N] in bf16."""
    return weight_bytes(n, k, int4) + 2 * m * (k + n)


def num_copies(num_bytes: int) -> int:
    """Weight copies a timed graph rotates through: enough for _ROTATE_BYTES, 2 to 64."""
    return max(2, min(64, math.ceil(_ROTATE_BYTES / max(1, num_bytes))))


def model_rows(rows: list[dict], method: str, lm_head_method: str) -> list[dict]:
    """Per M: NUM_LAYERS x (every layer shape) + the LM head, summed time and bytes, and bytes /
    time as a fraction of bandwidth (from each row's `ms` and `fraction_of_bandwidth`)."""
    out = []
    for m in sorted({r["m"] for r in rows}):
        at_m = {(r["layer"], r["method"]): r for r in rows if r["m"] == m}
        parts = [(NUM_LAYERS, at_m.get((name, method))) for name in LAYERS]
        parts.append((1, at_m.get(("lm_head", lm_head_method))))
        if any(row is None for _, row in parts):
            continue
        ms = sum(count * row["ms"] for count, row in parts)
        bound_ms = sum(count * row["ms"] * row["fraction_of_bandwidth"] for count, row in parts)
        out.append({"m": m, "method": method, "lm_head": lm_head_method, "ms": ms,
                    "bound_ms": bound_ms, "fraction_of_bandwidth": bound_ms / ms})  # fmt: skip
    return out


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of `columns` (floats to 3 significant digits, missing as '-')."""

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# -- GPU side -----------------------------------------------------------------------------------


def _graph_ms(calls: list[Callable[[], object]], rep_ms: float) -> float:
    """Median ms of one call, the calls captured together in a CUDA graph (do_bench_cudagraph)."""
    import triton.testing

    def run_all():
        for call in calls:
            call()

    run_all()  # compile outside the capture
    torch.cuda.synchronize()
    bench = getattr(triton.testing, "do_bench_cudagraph", None)
    if bench is None:
        ms = triton.testing.do_bench(run_all, rep=rep_ms, return_mode="median")
    else:
        with torch.cuda.stream(torch.cuda.Stream()):
            ms = bench(run_all, rep=rep_ms, return_mode="median")
    return ms / len(calls)


def _weights(n: int, k: int, copies: int, int4: bool, gen: torch.Generator) -> list:
    from pdray.quantization.int4 import Int4Weight, quantize

    w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
    if not int4:
        return [w] + [w.clone() for _ in range(copies - 1)]
    q = quantize(w, GROUP_SIZE, symmetric=False)
    return [Int4Weight(q.qweight.clone(), q.scales.clone(), q.zeros.clone()) for _ in range(copies)]


def _methods(m: int) -> dict[str, tuple[bool, Callable]]:
    """name -> (int4 weight?, fn(x, w, out))."""
    from pdray.kernels.gemv import linear
    from pdray.kernels.int4_gemm import Int4Path, int4_linear

    def cublas(x, w, out):
        return torch.mm(x, w.t(), out=out)

    methods = {"cublas": (False, cublas), "gemv": (False, lambda x, w, out: linear(x, w, out=out))}
    methods["int4"] = (True, lambda x, q, out: int4_linear(x, q, out=out))
    if m > 16:
        methods["int4_gemm"] = (
            True, lambda x, q, out: int4_linear(x, q, out=out, path=Int4Path.GEMM),
        )  # fmt: skip
    return methods


def time_case(m, weights, fn, rep_ms, gen, graph: bool = True) -> float:
    """Median ms of fn(x [m, K], w, out) per weight in `weights` (a CUDA graph over all of them),
    or of one plain call on the first (`graph=False`)."""
    w0 = weights[0]
    n, k = (w0.qweight.shape[0], w0.qweight.shape[1] * 2) if hasattr(w0, "qweight") else w0.shape
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    calls = [lambda w=w: fn(x, w, out) for w in weights]
    if not graph:
        import triton.testing

        return triton.testing.do_bench(calls[0], rep=rep_ms, return_mode="median")
    return _graph_ms(calls, rep_ms)


def bench_decode(ms_values, read_gbps, rep_ms) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    shapes = {**LAYERS, "lm_head": LM_HEAD}
    for name, (n, k) in shapes.items():
        weights = {int4: _weights(n, k, num_copies(weight_bytes(n, k, int4)), int4, gen)
                   for int4 in ((False,) if name == "lm_head" else (False, True))}  # fmt: skip
        for m in ms_values:
            for method, (int4, fn) in _methods(m).items():
                if int4 not in weights:
                    continue  # the LM head stays in full precision
                t = time_case(m, weights[int4], fn, rep_ms, gen)
                frac = read_bytes(m, n, k, int4) / (t * 1e-3) / (read_gbps * 1e9)
                rows.append({"m": m, "layer": name, "method": method, "ms": t,
                             "fraction_of_bandwidth": frac})  # fmt: skip
                print(f"M={m:<3} {name:8} {method:10} {t * 1e3:9.1f} us  {frac:.3f} of bw",
                      flush=True)  # fmt: skip
    return rows


def bench_prefill(ms_values, matmul_tflops, rep_ms) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for name, (n, k) in LAYERS.items():
        weights = {int4: _weights(n, k, 1, int4, gen) for int4 in (False, True)}
        for m in ms_values:
            bf16_ms = None
            for method, (int4, fn) in _methods(m).items():
                if method == "gemv":
                    continue
                t = time_case(m, weights[int4], fn, rep_ms, gen, graph=False)
                bf16_ms = t if method == "cublas" else bf16_ms
                frac = 2 * m * n * k / (t * 1e-3) / (matmul_tflops * 1e12)
                rows.append({"m": m, "layer": name, "method": method, "ms": t,
                             "fraction_of_matmul": frac, "speed_vs_bf16": bf16_ms / t})  # fmt: skip
                print(f"M={m} {name:8} {method:10} {t:8.3f} ms  {frac:.3f} of matmul", flush=True)
    return rows


def tune_grid(m: int) -> dict[str, list[tuple]]:
    """Block-size candidates at M, per kernel: gemv (GemvConfig fields), int4_gemv and int4_gemm
    (Int4Config fields; block_groups counted in groups of 128 columns)."""
    grid: dict[str, list[tuple]] = {"gemv": [], "int4_gemv": [], "int4_gemm": []}
    # int4 GEMM split over K (last two fields: programs a multiprocessor, split; split 0 = as
    # many as fill the programs a multiprocessor, so it follows the layer's N)
    if m > 16:
        grid["int4_gemm"] += [(64, bn, bg, 4, 3) for bn in (32, 64) for bg in (1, 2)]
        grid["int4_gemm"] += [(64, 64, 1, 4, 3, False), (128, 64, 1, 8, 3)]
        grid["int4_gemm"] += [(64, bn, bg, w, 3, True, 4, p, 0) for bn in (32, 64, 128)
                              for bg in (1, 2) for w in (4, 8) for p in (2, 4)]  # fmt: skip
        grid["int4_gemm"] += [(64, bn, 1, 4, 3, True, 4, 0, sk) for bn in (32, 64, 128)
                              for sk in (2, 4, 8)]  # fmt: skip
        return grid
    if m == 1:
        sizes = [(bn, bk) for bk in (512, 1024, 2048) for bn in (2, 4, 8)]
        grid["gemv"] += [(1, bn, bk, False, w, 3) for bn, bk in sizes for w in (2, 4, 8)]
        # int4 GEMV (words per chunk c): a step of 32 w t chunks (t per thread) puts the warps
        # along K, so each thread holds all bn rows of its chunks and reads their x once
        # (bn c t <= 32 words of rows a thread, at most 4096 columns a step); then the two
        # defaults, whose warps take rows (a step's chunks fewer than the threads)
        grid["int4_gemv"] += [
            (1, bn, 2 * w * t * c, w, 1, True, c)
            for c in (1, 2, 4)
            for w in (1, 2, 4, 8)
            for t in (1, 2)
            for bn in (2, 4, 8, 16)
            if bn * c * t <= 32 and 2 * w * t * c <= 32
        ]
        grid["int4_gemv"] += [(1, 4, 4, 2, 1), (1, 4, 8, 4, 1), (1, 16, 4, 4, 1, False)]
        # x held in registers, tiles of bn rows, p programs a multiprocessor
        grid["int4_gemv"] += [(1, bn, 1, w, 1, True, 4, p) for bn in (1, 2, 4) for w in (4, 8)
                              for p in (2, 4, 8)]  # fmt: skip
        return grid
    if m <= 4:
        fma_m = 1 << (m - 1).bit_length()
        sizes = [(4, 256), (8, 256), (4, 512), (8, 512)]
        grid["gemv"] += [(fma_m, bn, bk, False, 4, 3) for bn, bk in sizes]
        grid["int4_gemv"] += [(1, 16, 4, 2, 2), (1, 32, 4, 4, 2)]
    grid["gemv"] += [(16, bn, bk, True, 4, st) for bn in (16, 32) for bk in (128, 256)
                     for st in (3, 5)]  # fmt: skip
    grid["int4_gemm"] += [(16, bn, bg, 4, 3) for bn in (16, 32, 64) for bg in (1, 2)]
    grid["int4_gemm"] += [(16, 16, 1, 4, 3, False), (16, 32, 2, 4, 3, False)]
    grid["int4_gemm"] += [(16, bn, bg, 4, 3, True, 4, p, 0) for bn in (16, 32, 64, 128)
                          for bg in (1, 2) for p in (2, 4)]  # fmt: skip
    return grid


def tune(
    ms_values: list[int], read_gbps: float, rep_ms: float = 10.0, kernels: tuple = ()
) -> list[dict]:
    """Each candidate of `tune_grid` on the four layer shapes at each M: the summed layer time
    and its fraction of bandwidth (one layer of each shape), printed per kernel and M, best first."""
    from pdray.kernels.gemv import GemvConfig, linear
    from pdray.kernels.int4_gemm import Int4Config, Int4Path, int4_linear

    makers = {
        "gemv": (False, lambda c: lambda x, w, out: linear(x, w, out=out, config=GemvConfig(*c))),
        "int4_gemv": (True, lambda c: lambda x, q, out: int4_linear(
            x, q, out=out, path=Int4Path.GEMV, config=Int4Config(*c))),
        "int4_gemm": (True, lambda c: lambda x, q, out: int4_linear(
            x, q, out=out, path=Int4Path.GEMM, config=Int4Config(*c))),
    }  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(2)
    times: dict[tuple, float | None] = {}
    for name, (n, k) in LAYERS.items():
        weights = {i4: _weights(n, k, num_copies(weight_bytes(n, k, i4)), i4, gen)
                   for i4 in (False, True)}  # fmt: skip
        for m in ms_values:
            for kernel, configs in tune_grid(m).items():
                if kernels and kernel not in kernels:
                    continue
                int4, make = makers[kernel]
                for c in configs:
                    try:
                        t = time_case(m, weights[int4], make(c), rep_ms, gen)
                    except Exception as e:  # a config that does not compile or fit: no time
                        print(f"{kernel} {c} M={m} {name}: {type(e).__name__}: {e}"[:300])
                        t = None
                    times[(kernel, m, c, name)] = t
        del weights
    rows = []
    for m in ms_values:
        for kernel, configs in tune_grid(m).items():
            if kernels and kernel not in kernels:
                continue
            results = []
            for c in configs:
                ts = [times[(kernel, m, c, name)] for name in LAYERS]
                if any(t is None for t in ts):
                    continue
                num_bytes = sum(read_bytes(m, n, k, kernel != "gemv") for n, k in LAYERS.values())
                row = {"kernel": kernel, "m": m, "config": str(c), "layers_us": sum(ts) * 1e3}
                row["fraction_of_bandwidth"] = num_bytes / (sum(ts) * 1e-3) / (read_gbps * 1e9)
                row.update({f"{name}_us": t * 1e3 for name, t in zip(LAYERS, ts, strict=True)})
                results.append(row)
            results.sort(key=lambda r: -r["fraction_of_bandwidth"])
            rows += results
            columns = ["kernel", "m", "config", "layers_us", "fraction_of_bandwidth"]
            if results:
                print(format_table(results[:6], columns + [f"{name}_us" for name in LAYERS]))
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pdray.bench.linear needs a CUDA GPU")
    from pdray.bench.engine import measure_matmul_tflops
    from pdray.kernels.bandwidth import measure_read_bandwidth_gbps

    read_gbps = measure_read_bandwidth_gbps()
    matmul_tflops = measure_matmul_tflops()
    print(f"HBM read bandwidth {read_gbps:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    result: dict = {"gpu": torch.cuda.get_device_name(), "read_bandwidth_gbps": read_gbps,
                    "matmul_tflops": matmul_tflops}  # fmt: skip
    if args.tune:
        result["tune"] = tune(args.decode_m, read_gbps, kernels=tuple(args.tune_kernels))
    else:
        decode = bench_decode(args.decode_m, read_gbps, args.rep_ms)
        model = [*model_rows(decode, "cublas", "cublas"), *model_rows(decode, "gemv", "gemv"),
                 *model_rows(decode, "int4", "gemv")]  # fmt: skip
        prefill = bench_prefill(args.prefill_m, matmul_tflops, args.rep_ms)
        result.update(decode=decode, model=model, prefill=prefill)
        print(format_table(decode, ["m", "layer", "method", "ms", "fraction_of_bandwidth"]))
        print(format_table(model, ["m", "method", "lm_head", "ms", "bound_ms",
                                   "fraction_of_bandwidth"]))  # fmt: skip
        print(format_table(prefill, ["m", "layer", "method", "ms", "fraction_of_matmul",
                                     "speed_vs_bf16"]))  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
