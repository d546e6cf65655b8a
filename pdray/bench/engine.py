"""Engine benchmark: decode and prefill times as ratios to the GPU's measured limits.

    python -m pdray.bench.engine --model dummy:llama3-8b --out bench_engine.json
    python -m pdray.bench.engine --model dummy:llama3-8b --quantization wint4 --no-hf

`--quantization wint4` times the int4 engine: its decode bound counts the int4 codes, scales and
zeros it reads (embeddings and LM head in full precision).

In one run it measures the GPU's HBM read bandwidth and bf16 matmul rate, then times the model
runner: decode steps at several batch sizes over a fixed context (graph replay incl. LM head +
sampling, the way the runner decodes with CUDA graphs; the runner's `execute` replaying the same
graphs; and its eager `execute` for comparison), one-prompt prefills, and transformers' own
`generate` at batch 1 on the same weights. Bounds: decode = (weight bytes + KV bytes read) /
read bandwidth; prefill = FLOPs / matmul rate.

Tensor parallel (`--tensor-parallel-size N`, N GPUs of one host): rank 0 is this process and
ranks 1..N-1 are the runner's follower processes, which run a model forward only when rank 0's
`runner.execute` (or KV-cache binding, or graph capture) broadcasts it to them. So with N > 1 the
model runs only through the runner: decode `execute_ms` = `runner.execute` with the runner's own
CUDA graphs, including the broadcast of each step to the followers; prefill likewise. Skipped:
direct graph replay (a forward on rank 0 alone: its first all-reduce would hang), eager decode and
`--profile` (they turn CUDA graphs off on rank 0 only, so the ranks would run different forwards;
`--profile` is refused, as is `--no-fused-ops`, which would reach rank 0 only) and the
transformers baseline (it needs the whole model on rank 0). Counts and bounds are then per GPU:
rank 0's shard of the weights and KV heads over rank 0's GPU's read bandwidth or matmul rate,
communication not included. Compare runs of different sizes by `execute_ms`:

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python -m pdray.bench.engine --model dummy:llama3-8b --batch-sizes 1 64 --no-hf \\
        --tensor-parallel-size 1 --out tp1.json
    python -m pdray.bench.engine --model dummy:llama3-8b --batch-sizes 1 64 \\
        --tensor-parallel-size 2 --out tp2.json
    python -m pdray.bench.engine --compare tp1.json tp2.json

`--compare BASE OTHER` reads two saved reports and prints, per batch size they share, OTHER's
decode `execute_ms` / BASE's (e.g. TP2 step time / TP1 step time); it needs no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F

from pdray.bench.engine_compare import run_compare
from pdray.bench.hf_baseline import hf_decode_ms_per_token
from pdray.bench.rank_tasks import fill_kv_cache_normal, time_all_reduces
from pdray.bench.timing import device_median_ms, wall_median_ms
from pdray.config import EngineConfig, Quantization
from pdray.layers.linear import LinearBase
from pdray.worker.batch import SamplingRow, StepBatch
from pdray.worker.cuda_graph import DecodeCudaGraphs
from pdray.worker.model_runner import ModelRunner


def measure_matmul_tflops(size: int = 8192) -> float:
    """bf16 matmul rate of the current GPU on random data, TFLOP/s (median of do_bench)."""
    import triton.testing

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * size**3 / (ms * 1e-3) / 1e12


def decode_batch(num_seqs: int, context_len: int, block_size: int) -> StepBatch:
    """num_seqs sequences, each decoding token `context_len` over disjoint contiguous blocks."""
    blocks_per_seq = -(-context_len // block_size)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)]
    pos = context_len - 1
    return StepBatch(
        input_ids=[7] * num_seqs,
        positions=[pos] * num_seqs,
        slot_mapping=[t[pos // block_size] * block_size + pos % block_size for t in tables],
        query_lens=[1] * num_seqs,
        seq_lens=[context_len] * num_seqs,
        block_tables=tables,
        sample_indices=list(range(num_seqs)),
        sampling_rows=[SamplingRow(seq_id=f"s{i}", temperature=0.0) for i in range(num_seqs)],
    )


def engine_decode_steps(batch: StepBatch) -> tuple[StepBatch, StepBatch]:
    """`batch` as the engine sends it with persistent block tables (rows 0..S-1 of the runner's
    device tables): the first step writes every table (row, column, block id), later steady
    decode steps carry only the row ids."""
    rows = list(range(len(batch.query_lens)))
    writes = [
        value
        for row, table in enumerate(batch.block_tables)
        for column, block in enumerate(table)
        for value in (row, column, block)
    ]
    first = dataclasses.replace(
        batch, block_tables=[], table_rows=rows, table_clears=rows, table_writes=writes
    )
    return first, dataclasses.replace(batch, block_tables=[], table_rows=rows)


def prefill_batch(prompt_len: int, block_size: int) -> StepBatch:
    table = list(range(-(-prompt_len // block_size)))
    return StepBatch(
        input_ids=[(i * 7919) % 100_000 + 3 for i in range(prompt_len)],
        positions=list(range(prompt_len)),
        slot_mapping=list(range(prompt_len)),
        query_lens=[prompt_len],
        seq_lens=[prompt_len],
        block_tables=[table],
        sample_indices=[0],
        sampling_rows=[SamplingRow(seq_id="p", temperature=0.0)],
    )


def model_counts(runner: ModelRunner) -> dict[str, int]:
    """Bytes of weights a decode step reads, and matmul FLOPs per token (linear layers), on this
    rank: with tensor parallel, rank 0's shard of the weights and its KV heads. With wint4 the
    bytes are the int4 codes, scales and zeros, the FLOPs those of the full-size matmuls."""
    read_bytes = 0
    for name, p in runner.model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            continue  # a step reads only its tokens' rows
        read_bytes += p.numel() * p.element_size()
    linear_params = sum(
        m.in_features * m.out_features for m in runner.model.modules() if isinstance(m, LinearBase)
    )
    layer = runner.attention_layers[0]
    return {
        "weight_read_bytes": read_bytes,
        "linear_params": linear_params,
        "lm_head_params": runner.model.lm_head.shard_size * runner.model.lm_head.hidden_size,
        "kv_bytes_per_token": 2
        * len(runner.attention_layers)
        * layer.num_kv_heads
        * layer.head_dim
        * runner.dtype.itemsize,
        "attn_width": layer.num_heads * layer.head_dim,
        "num_layers": len(runner.attention_layers),
    }


def prefill_flops(counts: dict[str, int], prompt_len: int) -> float:
    linear = 2.0 * prompt_len * counts["linear_params"] + 2.0 * counts["lm_head_params"]
    # QK^T and PV over the causal half: 2 matmuls x 2 FLOPs x T^2 / 2 x Hq * D, per layer
    attention = 2.0 * prompt_len * prompt_len * counts["attn_width"] * counts["num_layers"]
    return linear + attention


def decode_bound_ms(counts: dict[str, int], num_seqs: int, context_len: int, read_gbps: float):
    """(weight bytes + KV bytes a decode step reads) / read bandwidth, in ms (per GPU)."""
    kv_bytes = num_seqs * context_len * counts["kv_bytes_per_token"]
    return (counts["weight_read_bytes"] + kv_bytes) / (read_gbps * 1e9) * 1e3


def graph_batch_size(graphs: DecodeCudaGraphs | None, batch: StepBatch) -> int | None:
    """Rows of the graph that replays `batch` (None: no graphs, or a step they cannot run, which
    `runner.execute` runs eager)."""
    if graphs is None or not graphs.can_run(batch):
        return None
    return graphs.padded_size(len(batch.query_lens))


def bench_decode(runner, graphs, counts, batch_sizes, context_len, read_gbps, iters):
    """One GPU (tensor_parallel_size 1): replay alone, replay + sampling, `runner.execute` with
    the same graphs, and `runner.execute` without graphs."""
    runner.graphs = graphs  # what the runner replays, as the engine's runner does
    rows = []
    bs = runner.config.block_size
    for n in batch_sizes:
        first, batch = engine_decode_steps(decode_batch(n, context_len, bs))
        runner.execute(first)  # writes the tables; the timed steps send only the rows
        graph_batch = graph_batch_size(graphs, batch)

        def replay_only(graph_batch=graph_batch):
            graphs.graphs[graph_batch].replay()

        @torch.inference_mode()  # as the runner's steps run (the sampler's buffers are made so)
        def graph_step(batch=batch):
            return runner.sampler(graphs.run(batch, runner.block_tables), batch.sampling_rows)

        graphs.run(batch, runner.block_tables)  # stage this batch's inputs for replay_only
        gpu_ms = device_median_ms(replay_only, iters)
        step_ms = wall_median_ms(graph_step, iters)
        execute_ms = wall_median_ms(lambda batch=batch: runner.execute(batch), iters)
        runner.graphs = None
        try:
            eager_ms = wall_median_ms(lambda batch=batch: runner.execute(batch), max(3, iters // 4))
        finally:
            runner.graphs = graphs
        bound_ms = decode_bound_ms(counts, n, context_len, read_gbps)
        rows.append({
            "batch": n,
            "context_len": context_len,
            "graph_batch": graph_batch,
            "bound_ms": bound_ms,
            "graph_replay_ms": gpu_ms,
            "step_ms": step_ms,
            "execute_ms": execute_ms,
            "eager_step_ms": eager_ms,
            "step_over_bound": step_ms / bound_ms,
            "bound_fraction": bound_ms / step_ms,
            "replay_bound_fraction": bound_ms / gpu_ms,
        })  # fmt: skip
        print(f"decode b={n:4d} ctx={context_len}: step {step_ms:7.3f} ms (replay {gpu_ms:7.3f}, "
              f"execute {execute_ms:7.3f}, eager {eager_ms:7.3f}), bound {bound_ms:7.3f} ms, "
              f"bound/step {bound_ms / step_ms:.3f}", flush=True)  # fmt: skip
    return rows


def bench_decode_tp(runner, counts, batch_sizes, context_len, read_gbps, iters):
    """Tensor parallel: decode steps only through `runner.execute` (its CUDA graphs on every rank),
    which first broadcasts the step to the followers, so every rank joins the all-reduces. The
    time is rank 0's wall time of the whole step: broadcast, replay, LM head, sampling."""
    rows = []
    for n in batch_sizes:
        first, batch = engine_decode_steps(decode_batch(n, context_len, runner.config.block_size))
        runner.execute(first)  # every rank writes the tables; timed steps send only the rows
        execute_ms = wall_median_ms(lambda batch=batch: runner.execute(batch), iters)
        bound_ms = decode_bound_ms(counts, n, context_len, read_gbps)
        rows.append({
            "batch": n,
            "context_len": context_len,
            "graph_batch": graph_batch_size(runner.graphs, batch),
            "bound_ms": bound_ms,
            "execute_ms": execute_ms,
            "bound_fraction": bound_ms / execute_ms,
        })  # fmt: skip
        print(f"decode b={n:4d} ctx={context_len}: execute {execute_ms:7.3f} ms (incl. broadcast "
              f"to the followers), bound per GPU {bound_ms:7.3f} ms, "
              f"bound/execute {bound_ms / execute_ms:.3f}", flush=True)  # fmt: skip
    return rows


def bench_all_reduce(runner, counts, token_counts, steps: dict, iters: int = 50) -> list[dict]:
    """All-reduce time per step: a forward has one all-reduce after the embedding and two per
    layer (attention output, MLP down projection) of [tokens, hidden], each timed replayed from a
    CUDA graph; `steps` maps token count -> the step's measured ms, for the fraction.
    `all_reduce_ms` is the path the model takes (the peer all-reduce of kernels/all_reduce.py up
    to its size limit, else NCCL), `nccl_ms` NCCL's."""
    per_call = runner.tp_group.run_together(time_all_reduces, runner, token_counts, iters)
    fast = runner.tp.collectives.fast
    calls = 2 * counts["num_layers"] + 1
    rows = []
    for tokens in token_counts:
        used, nccl = per_call[tokens]
        path = (
            "peer"
            if fast is not None
            and tokens * runner.arch.hidden_size * runner.dtype.itemsize <= fast.max_bytes
            else "nccl"
        )
        per_step = calls * used
        rows.append({"tokens": tokens, "path": path, "all_reduce_ms": used, "nccl_ms": nccl,
                     "calls_per_step": calls, "per_step_ms": per_step,
                     "step_ms": steps.get(tokens),
                     "fraction_of_step": per_step / steps[tokens] if tokens in steps else None})  # fmt: skip
        share = f", {per_step / steps[tokens]:.3f} of the step" if tokens in steps else ""
        print(f"all-reduce of [{tokens}, hidden]: {used * 1e3:.1f} us ({path}; NCCL "
              f"{nccl * 1e3:.1f} us); x{calls} per step = {per_step:.3f} ms{share}",
              flush=True)  # fmt: skip
    return rows


def profile_decode(runner, counts, batch_sizes, context_len, read_gbps, steps: int = 5) -> dict:
    """Device time per decode step by kernel (torch.profiler over eager steps: a kernel takes the
    same time inside a CUDA graph), and the bandwidth the linear layers' kernels reach."""
    from torch.profiler import ProfilerActivity, profile

    report = {}
    for n in batch_sizes:
        batch = decode_batch(n, context_len, runner.config.block_size)
        runner.graphs, graphs = None, runner.graphs
        runner.execute(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.execute(batch)
            torch.cuda.synchronize()
        runner.graphs = graphs
        kernels = [
            (e.key, e.device_time_total / steps, e.count // steps)
            for e in prof.key_averages()
            if e.device_time_total > 0
        ]
        kernels.sort(key=lambda k: -k[1])
        total_us = sum(us for _, us, _ in kernels)
        gemm_us = sum(us for name, us, _ in kernels if _is_gemm(name))
        report[n] = {
            "device_us_per_step": total_us,
            "gemm_us_per_step": gemm_us,
            "gemm_read_gbps": counts["weight_read_bytes"] / (gemm_us * 1e-6) / 1e9,
            "gemm_fraction_of_read_bandwidth": counts["weight_read_bytes"]
            / (gemm_us * 1e-6)
            / (read_gbps * 1e9),
            "top_kernels": [
                {"kernel": name[:120], "us_per_step": us, "launches_per_step": count}
                for name, us, count in kernels[:15]
            ],
        }
        fraction = report[n]["gemm_fraction_of_read_bandwidth"]
        print(f"profile b={n}: device {total_us:.0f} us/step, linear kernels {gemm_us:.0f} us "
              f"({fraction:.2f} of read bandwidth)")  # fmt: skip
        for name, us, count in kernels[:8]:
            print(f"    {us:8.1f} us  x{count:<4d} {name[:90]}")
    return report


def _is_gemm(name: str) -> bool:
    name = name.lower()
    return any(k in name for k in ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "matmul"))


def bench_prefill(runner, counts, prompt_lens, matmul_tflops, iters):
    rows = []
    for n in prompt_lens:
        batch = prefill_batch(n, runner.config.block_size)
        ms = wall_median_ms(lambda batch=batch: runner.execute(batch), iters)
        flops = prefill_flops(counts, n)
        bound_ms = flops / (matmul_tflops * 1e12) * 1e3
        rows.append({
            "prompt_len": n, "ms": ms, "flops": flops, "bound_ms": bound_ms,
            "matmul_fraction": bound_ms / ms, "achieved_tflops": flops / ms / 1e9,
        })  # fmt: skip
        print(f"prefill {n:5d} tokens: {ms:8.2f} ms, bound {bound_ms:7.2f} ms, "
              f"fraction of matmul {bound_ms / ms:.3f}", flush=True)  # fmt: skip
    return rows


def bench_attention(runner, counts, context_len, prompt_lens, read_gbps, matmul_tflops):
    """One layer's attention alone: decode at batch 64 against the KV bytes it must read, and a
    fresh prompt through the Triton prefill kernel against SDPA's backends (the measured pick)."""
    import triton.testing

    from pdray.kernels.paged_decode import choose_num_splits, paged_decode_attention

    layer = runner.attention_layers[0]
    cache, bs, dev = layer.kv_cache, runner.config.block_size, runner.device
    hq, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    out: dict = {}
    n = 64
    batch = decode_batch(n, context_len, bs)
    q = torch.randn(n, hq, d, device=dev, dtype=runner.dtype)
    tables = torch.tensor(batch.block_tables, dtype=torch.int32, device=dev)
    lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=dev)
    splits = choose_num_splits(n, hkv, context_len, runner.backend.num_sms)
    ms = triton.testing.do_bench(
        lambda: paged_decode_attention(q, cache, tables, lens, d**-0.5, None, splits),
        return_mode="median",
    )
    kv_bytes = n * context_len * counts["kv_bytes_per_token"] / counts["num_layers"]
    out["decode_b64_ms"] = ms
    out["decode_b64_bandwidth_fraction"] = kv_bytes / (ms * 1e-3) / (read_gbps * 1e9)
    print(f"decode attention b=64 ctx={context_len}: {ms * 1e3:.1f} us, "
          f"{out['decode_b64_bandwidth_fraction']:.3f} of read bandwidth", flush=True)  # fmt: skip
    for t in prompt_lens:
        for name, ms in _prefill_attention_ms(runner, t).items():
            out[f"prefill_{t}_{name}_ms"] = ms
            tflops = 2.0 * t * t * hq * d / ms / 1e9 if ms == ms else float("nan")
            print(f"prefill attention {t} tokens {name}: {ms * 1e3:8.1f} us, "
                  f"{tflops:6.0f} TFLOP/s", flush=True)  # fmt: skip
    return out


def _prefill_attention_ms(runner, t: int) -> dict[str, float]:
    """One layer's causal attention over a fresh t-token prompt: Triton prefill vs SDPA."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pdray.kernels.paged_prefill import paged_prefill_attention

    layer = runner.attention_layers[0]
    cache, bs, dev, dt = layer.kv_cache, runner.config.block_size, runner.device, runner.dtype
    q = torch.randn(t, layer.num_heads, layer.head_dim, device=dev, dtype=dt)
    k = torch.randn(1, layer.num_kv_heads, t, layer.head_dim, device=dev, dtype=dt)
    v = torch.randn_like(k)
    table = torch.arange(-(-t // bs), dtype=torch.int32, device=dev)[None]
    starts = torch.tensor([0, t], dtype=torch.int32, device=dev)
    seq = torch.tensor([t], dtype=torch.int32, device=dev)

    def sdpa(backend) -> torch.Tensor:
        q4 = q.transpose(0, 1)[None]
        if backend is None:
            return F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=True)

    candidates = {
        "triton": lambda: paged_prefill_attention(q, cache, starts, seq, table, t, 0.1, None),
        "sdpa_default": lambda: sdpa(None),
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
    }
    timings = {}
    for name, fn in candidates.items():
        try:
            timings[name] = triton.testing.do_bench(fn, return_mode="median")
        except RuntimeError as e:
            print(f"prefill attention {t} {name}: unavailable ({str(e)[:100]})")
            timings[name] = float("nan")
    return timings


_NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
_BOUNDS = {
    "one_gpu": "decode bound_ms = (weight bytes + KV bytes a step reads) / read bandwidth; "
    "prefill bound_ms = FLOPs / bf16 matmul rate",
    "tensor_parallel": "per GPU: counts are rank 0's shard (its weights, KV heads, vocab slice); "
    "decode bound_ms = its bytes read / rank 0's GPU read bandwidth, prefill bound_ms = its FLOPs "
    "/ that GPU's matmul rate; all-reduces and the step broadcast are not in the bounds; "
    "attention: one layer of rank 0's heads",
}
_DECODE_TIMING = {
    "one_gpu": "step_ms: graph replay + sampling; execute_ms: runner.execute replaying the same "
    "graphs (compare with tensor-parallel runs by this); graph_replay_ms: replay alone (device "
    "time); eager_step_ms: runner.execute without graphs",
    "tensor_parallel": "execute_ms: rank 0's wall time of runner.execute with the runner's CUDA "
    "graphs on every rank, including the broadcast of the step (a pickled StepBatch over gloo) to "
    "the follower ranks; replay alone, eager steps and the profile are not measured (rank 0 "
    "would run a forward the followers do not run)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dummy:llama3-8b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--quantization",
        choices=[q.value for q in Quantization],
        default=None,
        help="engine weight quantization (wint4: int4 linear layers; the bounds count their "
        "bytes; no transformers baseline)",
    )
    parser.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="with --quantization wint4: the LM head in int4 too (engine quantize_lm_head)",
    )
    parser.add_argument(
        "--no-fused-ops",
        action="store_true",
        help="plain-torch RMSNorm/rotary/SiLU (for comparison)",
    )
    parser.add_argument("--profile", action="store_true", help="per-kernel decode profile")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="GPUs the model is split over (ranks 1..N-1 run in child processes); with N > 1 "
        "decode and prefill are timed through runner.execute only",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("BASE_JSON", "OTHER_JSON"),
        help="print OTHER's decode execute_ms / BASE's per batch size from two saved reports "
        "(e.g. tp1.json tp2.json), then exit; needs no GPU",
    )
    parser.add_argument("--out", default="bench_engine.json")
    args = parser.parse_args(argv)
    tp = args.tensor_parallel_size
    if tp < 1:
        parser.error(f"--tensor-parallel-size must be at least 1, not {tp}")
    if tp > 1 and args.profile:
        parser.error(
            "--profile needs --tensor-parallel-size 1: it profiles eager steps by turning CUDA "
            "graphs off on rank 0 only, so the follower ranks would run a different forward "
            "and the collectives could hang"
        )
    if tp > 1 and args.no_fused_ops:
        parser.error(
            "--no-fused-ops needs --tensor-parallel-size 1: it turns the fused kernels off in "
            "this process only, not in the follower ranks"
        )
    return args


def _warn_if_multicast_on() -> None:
    missing = [f"{k}={v}" for k, v in _NO_MULTICAST_ENV.items() if os.environ.get(k) != v]
    if missing:
        print(f"warning: our device docs require NVLink multicast off for multi-GPU runs; "
              f"set {' '.join(missing)}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compare:
        try:
            return run_compare(*args.compare)
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"--compare: {e}") from e
    tp = args.tensor_parallel_size
    if not torch.cuda.is_available():
        raise SystemExit("pdray.bench.engine needs a CUDA GPU")
    if torch.cuda.device_count() < tp:
        raise SystemExit(
            f"--tensor-parallel-size {tp} needs {tp} GPUs; {torch.cuda.device_count()} visible"
        )
    if tp > 1:
        _warn_if_multicast_on()

    from pdray.kernels.bandwidth import measure_read_bandwidth_gbps

    read_gbps = measure_read_bandwidth_gbps()
    matmul_tflops = measure_matmul_tflops()
    print(f"HBM read bandwidth {read_gbps:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    config = EngineConfig(
        model=args.model,
        device="cuda",
        attention_backend="triton",
        max_num_seqs=max(args.batch_sizes),
        max_model_len=max(args.context_len, *args.prefill_lens),
        max_num_batched_tokens=max(args.prefill_lens),
        tensor_parallel_size=tp,
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
    )
    runner = ModelRunner(config)  # with tp > 1, also starts the follower ranks
    try:
        result = run_benchmarks(args, runner, read_gbps, matmul_tflops)
    finally:
        runner.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


def run_benchmarks(args, runner: ModelRunner, read_gbps: float, matmul_tflops: float) -> dict:
    """Every measurement of one run. With tensor parallel, the model runs only through the
    runner's broadcasting methods (execute, allocate_kv_cache): the followers run them too."""
    config = runner.config
    tp = config.tensor_parallel_size
    max_batch, max_len = config.max_num_seqs, config.max_model_len
    scope = "one_gpu" if tp == 1 else "tensor_parallel"
    if args.no_fused_ops:  # tp == 1 (parse_args)
        from pdray.layers.fused import set_fused_ops_enabled

        set_fused_ops_enabled(False)
    counts = model_counts(runner)
    result: dict = {
        "gpu": torch.cuda.get_device_name(),
        "model": args.model,
        "dtype": str(runner.dtype),
        "quantization": config.quantization.value if config.quantization else None,
        "quantize_lm_head": config.quantize_lm_head,
        "fused_ops": not args.no_fused_ops,
        "tensor_parallel_size": tp,
        "read_bandwidth_gbps": read_gbps,
        "matmul_tflops": matmul_tflops,
        "counts": counts,
        "bounds": _BOUNDS[scope],
        "decode_timing": _DECODE_TIMING[scope],
    }
    if tp > 1:
        print(f"tensor parallel {tp}: decode timed through runner.execute only (incl. the "
              "broadcast of each step to the followers); graph replay alone and eager decode "
              "skipped (rank 0 would run a forward the followers do not), and the transformers "
              "baseline (it needs the whole model); counts and bounds per GPU (rank 0's shard)",
              flush=True)  # fmt: skip
    elif config.quantization is not None:
        print("transformers baseline skipped: it runs full-precision weights", flush=True)
    elif not args.no_hf:
        hf_ms, check = hf_decode_ms_per_token(runner, args.context_len)
        result["hf_generate_batch1_ms_per_token"] = hf_ms
        result["hf_token_check"] = check.as_dict()  # same_tokens: whether the ratio is fair
        print(f"transformers generate, batch 1: {hf_ms:.3f} ms/token", flush=True)
        print(check.describe() if check.same_tokens else f"warning: {check.describe()}",
              flush=True)  # fmt: skip
    num_blocks = max(max_batch * -(-args.context_len // config.block_size),
                     -(-max_len // config.block_size))  # fmt: skip
    if tp == 1:
        runner.allocate_kv_cache(num_blocks)  # no max_model_len: the bench captures its graphs
        runner.build_block_tables(max_len)  # the engine's persistent tables, as on every rank
        fill_kv_cache_normal(runner)
        graphs = DecodeCudaGraphs(
            runner.model, runner.backend, max_num_seqs=max_batch, max_model_len=max_len,
            block_size=config.block_size, hidden_size=runner.arch.hidden_size, dtype=runner.dtype,
            device=runner.device, batch_sizes=args.batch_sizes,
        )  # fmt: skip
        t0 = time.perf_counter()
        graphs.capture()
        result["graph_capture_s"] = time.perf_counter() - t0
        result["graph_batch_sizes"] = graphs.batch_sizes
        result["decode"] = bench_decode(
            runner, graphs, counts, args.batch_sizes, args.context_len, read_gbps, args.iters
        )
    else:
        # Every rank binds its KV cache, then captures the runner's ladder of decode graphs.
        t0 = time.perf_counter()
        runner.allocate_kv_cache(num_blocks, max_model_len=max_len)
        result["graph_capture_s"] = time.perf_counter() - t0  # incl. binding the KV caches
        result["graph_batch_sizes"] = runner.graphs.batch_sizes if runner.graphs else []
        runner.tp_group.create("bench_fill_kv", fill_kv_cache_normal)  # on every follower
        fill_kv_cache_normal(runner)
        result["decode"] = bench_decode_tp(
            runner, counts, args.batch_sizes, args.context_len, read_gbps, args.iters
        )
    if args.profile:  # tp == 1 (parse_args)
        result["decode_profile"] = profile_decode(
            runner, counts, [1, 64], args.context_len, read_gbps
        )
    result["attention"] = bench_attention(
        runner, counts, args.context_len, args.prefill_lens, read_gbps, matmul_tflops
    )
    result["prefill"] = bench_prefill(runner, counts, args.prefill_lens, matmul_tflops, 5)
    if tp > 1:
        steps = {r["batch"]: r["execute_ms"] for r in result["decode"]}
        steps.update({r["prompt_len"]: r["ms"] for r in result["prefill"]})
        result["all_reduce"] = bench_all_reduce(runner, counts, sorted(steps), steps)
    if "hf_generate_batch1_ms_per_token" in result:
        pdray_ms = next(r["step_ms"] for r in result["decode"] if r["batch"] == 1)
        result["speedup_vs_hf_batch1"] = result["hf_generate_batch1_ms_per_token"] / pdray_ms
        same = result["hf_token_check"]["same_tokens"]
        print(f"batch-1 decode: {result['speedup_vs_hf_batch1']:.2f}x transformers generate"
              + ("" if same else " (warning: the two produced different tokens)"))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
