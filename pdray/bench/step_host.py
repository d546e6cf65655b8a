"""Host work of one decode step, without the model's forward.

    python -m pdray.bench.step_host --batch-sizes 1 64 --context-len 2048 --out step_host.json

Builds an `LLMEngine` on a tiny model (`dummy:tiny`, CPU by default), replaces the model's forward
and LM head by stubs that return preallocated tensors (logits over the first `--stub-vocab` token
ids, so that sampling costs its host work rather than an argmax over the vocabulary on the CPU),
brings `batch` greedy sequences to a context of about `--context-len` tokens, then times `--iters`
decode steps, medians in µs:

- `schedule`: `Scheduler.schedule`;
- `build`: the engine turning the schedule into a `StepBatch`;
- `runner`: `ModelRunner.execute_step` (input staging: block tables, metadata, tensors to the
  device; the stub forward; sampling and tokens back to the host);
- `sampler`: the sampling part of `runner`;
- `step`: all of `LLMEngine.step` (the above, plus appending and detokenizing the tokens);
- `pickle`: `pickle.dumps` + `loads` of what a tensor-parallel engine sends its followers every
  step (the batch, or `batch.for_followers()` where the code has it), and `pickle_bytes` its size;
- `graph_stage` (when this code has `DecodeInputs`): staging the batch into a decode CUDA graph's
  static inputs, on this device (the graph replay itself is not run).

On CUDA the runner's decode steps replay the tiny model's CUDA graphs (captured before the
stubs go in), so `runner` there includes a tiny forward.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time

import torch

from pdray.config import EngineConfig
from pdray.engine.llm_engine import LLMEngine
from pdray.sampling_params import SamplingParams


class _Timer:
    """Wraps a callable; records the wall time of each call while `on`."""

    def __init__(self, fn, sync: bool):
        self.fn, self.sync, self.on, self.times_us = fn, sync, False, []

    def __getattr__(self, name):  # the wrapped object's other methods (Sampler.free)
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        result = self.fn(*args, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        if self.on:
            self.times_us.append((time.perf_counter() - t0) * 1e6)
        return result


def stub_forward(engine: LLMEngine, max_tokens: int, vocab: int, seed: int = 0) -> None:
    """Replace the model's forward and LM head with slices of preallocated tensors (logits over
    the first `vocab` token ids)."""
    runner = engine.runner
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.zeros(max_tokens, engine.arch.hidden_size, dtype=runner.dtype)
    logits = torch.randn(max_tokens, vocab, generator=generator).to(runner.dtype)
    hidden, logits = hidden.to(runner.device), logits.to(runner.device)
    runner.model.forward = lambda input_ids, positions: hidden[: input_ids.shape[0]]
    runner.model.compute_logits = lambda h: logits[: h.shape[0]]


def bench_batch(args: argparse.Namespace, num_seqs: int) -> dict:
    config = EngineConfig(
        model=args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto",
        max_model_len=args.context_len, max_num_seqs=max(num_seqs, 2),
        num_kv_blocks=num_seqs * (-(-args.context_len // 16)) + 16, block_size=16,
    )  # fmt: skip
    engine = LLMEngine(config)
    stub_forward(
        engine, config.max_num_batched_tokens, min(args.stub_vocab, engine.arch.vocab_size)
    )
    sync = engine.runner.device.type == "cuda"
    steps = args.warmup + args.iters
    # Sequences whose prompts finish first decode while the others prefill: leave them room.
    prefill_steps = -(-num_seqs * args.context_len // config.max_num_batched_tokens)
    prompt_len = args.context_len - steps - prefill_steps - 2
    params = SamplingParams(temperature=0.0, max_tokens=steps + prefill_steps + 2, ignore_eos=True)
    generator = torch.Generator().manual_seed(1)
    for i in range(num_seqs):
        prompt = torch.randint(10, engine.arch.vocab_size, (prompt_len,), generator=generator)
        engine.add_request(f"r{i}", prompt.tolist(), params)
    while any(seq.num_output_tokens == 0 for r in engine.requests.values() for seq in r.seqs):
        engine.step()  # prefill (stubbed), first tokens

    batches = []
    build_batch = engine._build_batch

    def build(out):
        batches.append(build_batch(out))
        return batches[-1]

    timers = {
        "schedule": _Timer(engine.scheduler.schedule, False),
        "build": _Timer(build, False),
        "runner": _Timer(engine.runner.execute_step, sync),
        "sampler": _Timer(engine.runner.sampler, sync),
    }
    engine.scheduler.schedule = timers["schedule"]
    engine._build_batch = timers["build"]
    engine.runner.execute_step = timers["runner"]
    engine.runner.sampler = timers["sampler"]
    step_us = []
    for i in range(steps):
        timed = i >= args.warmup
        for timer in timers.values():
            timer.on = timed
        t0 = time.perf_counter()
        engine.step()
        if timed:
            step_us.append((time.perf_counter() - t0) * 1e6)
    if not all(len(b.query_lens) == num_seqs and b.num_tokens == num_seqs for b in batches):
        raise RuntimeError(f"a timed step was not a decode step of {num_seqs} sequences")
    batch = batches[-1]
    pickle_us = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        sent = batch.for_followers() if hasattr(batch, "for_followers") else batch
        pickle.loads(pickle.dumps(sent))
        pickle_us.append((time.perf_counter() - t0) * 1e6)
    row = {
        "batch": num_seqs,
        "context_len": max(batch.seq_lens),
        **{name: statistics.median(t.times_us) for name, t in timers.items()},
        "step": statistics.median(step_us),
        "pickle": statistics.median(pickle_us),
        "pickle_bytes": len(pickle.dumps(sent)),
    }
    stage_us = graph_stage_us(engine, batch, args.iters)
    if stage_us is not None:
        row["graph_stage"] = stage_us
    engine.close()
    return row


def graph_stage_us(engine: LLMEngine, batch, iters: int) -> float | None:
    """Median µs of staging `batch` into decode-graph inputs, where this code can do that."""
    from pdray.worker import cuda_graph

    inputs_cls = getattr(cuda_graph, "DecodeInputs", None)
    runner = engine.runner
    if inputs_cls is None:
        return None
    inputs = inputs_cls(
        max_batch_size=len(batch.query_lens), max_model_len=engine.max_model_len,
        block_size=engine.config.block_size, device=runner.device,
    )  # fmt: skip
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        inputs.stage(batch, len(batch.query_lens), runner.block_tables)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dummy:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--stub-vocab", type=int, default=16, help="width of the stub's logits")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host work is one thread's; other cores may be busy
    rows = []
    try:
        for num_seqs in args.batch_sizes:
            row = bench_batch(args, num_seqs)
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
