"""Does a prompt wait behind a batch? Prefill TTFT under a step-token budget.

    python -m pdray.bench.prefill_batching --model dummy:llama3-8b --prompts 4 --prompt-len 2048 \
        --budgets 2048,8192

For each budget (`max_num_batched_tokens`) a prefill-role engine gets `--prompts` random prompts
of `--prompt-len` tokens at once (a burst, as a prefill replica sees when requests arrive while it
computes) and is stepped until every prompt has its first token. Reported per budget: each
prompt's time from the burst to its first token (mean, first, last) and the time for all of them
(throughput), median over `--rounds` bursts after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pdray.config import EngineConfig, Role
from pdray.engine.llm_engine import LLMEngine
from pdray.sampling_params import SamplingParams


def _burst(engine: LLMEngine, prompts: list[list[int]], tag: str) -> list[float]:
    """Seconds from the burst to each prompt's first token, in arrival order."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    first: dict[str, float] = {}
    while len(first) < len(prompts):
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
            engine.release(out.request_id)
    return [first[f"{tag}-{i}"] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--budgets", default="2048,8192", help="max_num_batched_tokens values")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for budget in [int(b) for b in args.budgets.split(",")]:
        engine = LLMEngine(
            EngineConfig(
                model=args.model,
                device=args.device,
                role=Role.PREFILL,
                max_num_batched_tokens=budget,
                max_model_len=max(args.prompt_len + 16, 64),
            )  # fmt: skip
        )
        vocab = engine.arch.vocab_size
        rounds = []
        for r in range(args.rounds + 1):  # the first is a warm-up
            prompts = [
                rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(args.prompts)
            ]
            ttfts = _burst(engine, prompts, f"b{budget}-r{r}")
            if r:
                rounds.append(ttfts)
        mean = statistics.median(statistics.fmean(t) for t in rounds) * 1e3
        firsts = statistics.median(t[0] for t in rounds) * 1e3
        last = statistics.median(t[-1] for t in rounds) * 1e3
        rate = args.prompts * args.prompt_len / (last / 1e3)
        print(f"budget {budget:>6}: TTFT mean {mean:8.1f} ms, first prompt {firsts:8.1f} ms, "
              f"last {last:8.1f} ms; {rate:10.0f} prompt tokens/s", flush=True)  # fmt: skip
        engine.close()


if __name__ == "__main__":
    main()
