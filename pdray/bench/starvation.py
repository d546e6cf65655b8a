"""Fairness benchmark: does one huge request starve a short one?

`python -m pdray.bench.starvation --model dummy:llama3-8b --out starvation.json`

One mixed engine on its `EngineLoop` behind `LocalEngineBackend` (the same loop and backend the
local OpenAI server uses; a Serve replica runs the same loop). First the time to first token of a
short request on the idle engine (`--trials` requests one after another), then the same short
requests while one request with `n = --big-n` and `max_tokens = --big-max-tokens` (ignore_eos, so
it runs to the end) decodes. The issue's target: the loaded TTFT stays within 2x of the idle one
(median). Reported: both TTFT medians and p90s, their ratio, and how many of the big request's
sequences were still decoding when the last short request got its first token (the load was
really there for every trial).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time

from pdray.config import EngineConfig
from pdray.engine.llm_engine import LLMEngine
from pdray.entrypoints.openai.local_backend import LocalEngineBackend
from pdray.sampling_params import SamplingParams

TARGET_RATIO = 2.0


def short_prompt(length: int, trial: int, vocab_size: int) -> list[int]:
    """A distinct prompt per trial (no prefix-cache hit between trials)."""
    return [(trial * 7919 + 31 * j) % (vocab_size - 10) + 5 for j in range(length)]


async def first_token_s(backend: LocalEngineBackend, request_id: str, prompt: list[int]) -> float:
    """Seconds from submitting a one-token request to its first output."""
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    start_s = time.perf_counter()
    async for _ in backend.generate(request_id, prompt, params):
        return time.perf_counter() - start_s
    raise RuntimeError(f"{request_id} ended without an output")


def summarize(idle_s: list[float], loaded_s: list[float], big_tokens_left: int) -> dict:
    def p90(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    idle, loaded = statistics.median(idle_s), statistics.median(loaded_s)
    return {
        "idle_ttft_ms": {"median": 1e3 * idle, "p90": 1e3 * p90(idle_s)},
        "loaded_ttft_ms": {"median": 1e3 * loaded, "p90": 1e3 * p90(loaded_s)},
        "ratio_median": loaded / idle,
        "target_ratio": TARGET_RATIO,
        "met": loaded / idle <= TARGET_RATIO,
        "big_tokens_left_at_end": big_tokens_left,
    }


async def run(args: argparse.Namespace) -> dict:
    config = EngineConfig.from_kwargs(
        args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_model_len=args.short_len + args.big_max_tokens + 16,
    )  # fmt: skip
    engine = LLMEngine(config)
    vocab = engine.arch.vocab_size
    with LocalEngineBackend(engine) as backend:
        await first_token_s(backend, "warm-up", short_prompt(args.short_len, -1, vocab))
        idle_s = []
        for trial in range(args.trials):
            prompt = short_prompt(args.short_len, trial, vocab)
            idle_s.append(await first_token_s(backend, f"idle-{trial}", prompt))

        big_params = SamplingParams(
            n=args.big_n, max_tokens=args.big_max_tokens, ignore_eos=True, temperature=1.0, seed=0
        )
        big_prompt = short_prompt(args.short_len, 10_000, vocab)
        big_started = asyncio.Event()
        tokens_done = [0]

        async def big() -> None:
            async for output in backend.generate("big", big_prompt, big_params):
                tokens_done[0] = sum(len(c.token_ids) for c in output.outputs)
                big_started.set()

        big_task = asyncio.ensure_future(big())
        await asyncio.wait_for(big_started.wait(), args.timeout_s)
        loaded_s = []
        for trial in range(args.trials):
            prompt = short_prompt(args.short_len, 100 + trial, vocab)
            loaded_s.append(await first_token_s(backend, f"loaded-{trial}", prompt))
            await asyncio.sleep(args.gap_s)
        left = args.big_n * args.big_max_tokens - tokens_done[0]
        big_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await big_task
    result = summarize(idle_s, loaded_s, left)
    result["args"] = vars(args)
    if left <= 0:
        result["met"] = False
        result["note"] = "the big request finished before the trials did: the load was not there"
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dummy:llama3-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--short-len", type=int, default=128, help="short prompt tokens")
    parser.add_argument("--big-n", type=int, default=128)
    parser.add_argument("--big-max-tokens", type=int, default=2048)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--gap-s", type=float, default=0.05, help="pause between loaded trials")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="wait for the big request")
    parser.add_argument("--out", default="starvation.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    idle, loaded = result["idle_ttft_ms"], result["loaded_ttft_ms"]
    print(
        f"short request TTFT idle {idle['median']:.1f} ms (p90 {idle['p90']:.1f}), with n="
        f"{args.big_n} x {args.big_max_tokens} running {loaded['median']:.1f} ms (p90 "
        f"{loaded['p90']:.1f}): {result['ratio_median']:.2f}x (target <= {TARGET_RATIO:g}x: "
        f"{'met' if result['met'] else 'NOT met'}); big request tokens left "
        f"{result['big_tokens_left_at_end']}"
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
