"""Serving benchmark against any OpenAI-compatible endpoint, with `vllm bench serve`'s flags and
result keys where the concept is the same.

    python -m pdray.bench.serve --base-url http://127.0.0.1:8000 --dataset-name random \\
        --vocab-size 128256 --random-input-len 1024 --random-output-len 128 --num-prompts 500 \\
        --request-rates 1,2,4,8,inf --goodput ttft:500 tpot:50 --save-result

Steps: GET /v1/models (model name; vocab size when the server reports it) -> build the request sets
(seeded; the warm-ups and each rate have prompts of their own, so that a prefix cache cannot
answer a measured prompt) -> warm-up requests (not measured) -> for each request rate: send every request on its
arrival schedule, streaming, and time it -> metrics (see docs/benchmarks.md and
`pdray.bench.serve_metrics`) -> print a table, save the result JSON and PNG plots (CDFs of TTFT,
TPOT, ITL and E2E; for several rates, p99 TTFT/ITL and goodput against the rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from pdray.bench.serve_client import (
    Endpoint,
    arrival_times_s,
    check_arrival_params,
    fetch_models,
    make_client,
    run_requests,
)
from pdray.bench.serve_datasets import (
    DatasetName,
    PromptType,
    SampleRequest,
    random_requests,
    sharegpt_requests,
)
from pdray.bench.serve_metrics import (
    Metric,
    calculate_metrics,
    parse_goodput,
    parse_percentiles,
    per_request_lists,
    span_breakdown,
)
from pdray.bench.serve_results import print_result, save_results

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pdray.bench.serve",
        description="Benchmark an OpenAI-compatible server (like `vllm bench serve`).",
    )
    server = p.add_argument_group("server")
    server.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="openai",
        help="openai: /v1/completions; openai-chat: /v1/chat/completions",
    )
    server.add_argument("--base-url", help="server URL (default http://HOST:PORT)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", help="API path (default: the backend's)")
    server.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    server.add_argument("--api-key", help="sent as `Authorization: Bearer <key>`")
    server.add_argument(
        "--ready-check-timeout-sec",
        type=float,
        default=0.0,
        help="retry GET /v1/models this long while the server starts",
    )
    server.add_argument("--request-timeout-s", type=float, default=6 * 3600.0)

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=[d.value for d in DatasetName], default="random")
    data.add_argument("--dataset-path", help="ShareGPT JSON file (for --dataset-name sharegpt)")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument(
        "--random-input-len",
        type=int,
        default=1024,
        help="tokens per random prompt, after the shared prefix",
    )
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)]; 0: fixed",
    )
    data.add_argument(
        "--prefix-len",
        "--random-prefix-len",
        dest="prefix_len",
        type=int,
        help="tokens of the shared prefix (needed by --dataset-name prefix)",
    )
    data.add_argument(
        "--num-prefixes",
        type=int,
        default=1,
        help="distinct shared prefixes, given to requests round-robin",
    )
    data.add_argument(
        "--prompt-type",
        choices=[t.value for t in PromptType],
        help="random prompts as token ids (default for completions; exact lengths) "
        "or words (default for chat; lengths from the server's usage)",
    )
    data.add_argument(
        "--vocab-size",
        type=int,
        help="token ids are drawn below this (default: from /v1/models if reported)",
    )
    data.add_argument(
        "--sharegpt-output-len",
        type=int,
        help="max_tokens of every ShareGPT request (default: the reply's estimate)",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second; inf sends all at once",
    )
    load.add_argument("--request-rates", help="sweep: comma-separated rates, e.g. 1,2,4,inf")
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of arrival gaps: 1 Poisson, <1 burstier, >1 more even",
    )
    load.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    load.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests first")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens")
    load.add_argument("--temperature", type=float, help="sampling temperature (server default)")
    load.add_argument("--extra-body", help="JSON object merged into every request body")

    out = p.add_argument_group("results")
    out.add_argument(
        "--goodput",
        nargs="+",
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000",
    )
    out.add_argument("--metric-percentiles", default="90,99")
    out.add_argument(
        "--percentile-metrics", default="ttft,tpot,itl,e2el", help="metrics to report statistics of"
    )
    out.add_argument("--label", help="label of the run in the result JSON and file names")
    out.add_argument("--save-result", action="store_true", help="write the result JSON and plots")
    out.add_argument("--result-dir", default=".")
    out.add_argument("--result-filename", help="JSON file name (a sweep adds -<rate>qps)")
    out.add_argument("--no-plots", action="store_true", help="with --save-result, skip the PNGs")
    out.add_argument("--disable-tqdm", action="store_true")
    out.add_argument(
        "--breakdown",
        action="store_true",
        help="print where TTFT goes (spans a PD deployment reports in its usage)",
    )
    return p.parse_args(argv)


def _rates(args: argparse.Namespace) -> list[float]:
    if not args.request_rates:
        rates = [args.request_rate]
    else:
        try:
            rates = [float(r) for r in args.request_rates.split(",") if r.strip()]
        except ValueError:
            rates = []
        if not rates:
            raise ValueError(
                f"--request-rates takes numbers like 1,2,4,inf, got {args.request_rates!r}"
            )
    for rate in rates:
        check_arrival_params(rate, args.burstiness)
    return rates


WARMUP_DRAW = -1


def build_requests(
    args: argparse.Namespace, prompt_type: PromptType, vocab_size: int | None, draw: int = 0
) -> list[SampleRequest]:
    """The request set of draw `draw`: 0 for the first rate (seeded by --seed alone), i for the
    rate after i others, WARMUP_DRAW for the warm-ups. Each draw has prompts of its own: a
    server with prefix caching would otherwise answer every rate after the first, and the
    warmed-up prompts of the first, from its cache, and TTFT would not include the prefill."""
    if draw == 0:
        rng = np.random.default_rng(args.seed)
    else:  # [seed, 1] draws the arrivals; [seed, 0] would be the seed's own stream
        rng = np.random.default_rng([args.seed, 2 if draw == WARMUP_DRAW else draw + 2])
    num = args.num_warmups if draw == WARMUP_DRAW else args.num_prompts
    dataset = DatasetName(args.dataset_name)
    if dataset is DatasetName.SHAREGPT:
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path")
        return sharegpt_requests(args.dataset_path, num, rng, args.sharegpt_output_len)
    if dataset is DatasetName.PREFIX and not args.prefix_len:
        raise ValueError("--dataset-name prefix needs --prefix-len > 0 (tokens of shared prefix)")
    return random_requests(
        num,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        rng=rng,
        prompt_type=prompt_type,
        vocab_size=vocab_size,
        prefix_len=args.prefix_len or 0,
        num_prefixes=args.num_prefixes,
    )


@dataclass(slots=True)
class Options:
    """The parsed and checked flags that are not used as they come."""

    slos_ms: dict[Metric, float]
    percentiles: list[float]
    metrics: list[Metric]
    rates: list[float]
    prompt_type: PromptType
    extra_body: dict[str, Any]
    plots: bool


def check_args(args: argparse.Namespace) -> Options:
    """Validate the flags before anything is sent (ValueError names the flag)."""
    try:
        metrics = [Metric(m.strip()) for m in args.percentile_metrics.split(",") if m.strip()]
    except ValueError:
        raise ValueError(
            f"--percentile-metrics takes names among ttft,tpot,itl,e2el, got "
            f"{args.percentile_metrics!r}"
        ) from None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-body is not JSON: {e}") from None
    if not isinstance(extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    if args.temperature is not None:
        extra_body.setdefault("temperature", args.temperature)
    chat = args.backend == "openai-chat"
    prompt_type = PromptType(args.prompt_type or ("text" if chat else "token-ids"))
    if chat and prompt_type is PromptType.TOKEN_IDS:
        raise ValueError("--backend openai-chat sends text: use --prompt-type text")
    plots = args.save_result and not args.no_plots
    if plots:
        from pdray.bench.serve_plots import require_matplotlib

        require_matplotlib()
    return Options(
        slos_ms=parse_goodput(args.goodput),
        percentiles=parse_percentiles(args.metric_percentiles),
        metrics=metrics,
        rates=_rates(args),
        prompt_type=prompt_type,
        extra_body=extra_body,
        plots=plots,
    )


async def connect(
    client: httpx.AsyncClient, args: argparse.Namespace, options: Options
) -> tuple[Endpoint, int | None]:
    """Ask the server for its models, then build the endpoint; also the vocab size to draw
    token-id prompts from (--vocab-size, else what the server reports)."""
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    models_url = f"{base_url}/v1/models"
    try:
        cards = await fetch_models(client, models_url, args.api_key, args.ready_check_timeout_sec)
    except ConnectionError as e:
        if args.model is None:
            raise ConnectionError(f"{e}; is the server up? (or pass --model)") from e
        print(f"warning: {e}", file=sys.stderr)
        cards = []
    model = args.model or (cards[0].get("id") if cards else None)
    if model is None:
        raise ValueError(f"{models_url} lists no model; pass --model")
    card = next((c for c in cards if c.get("id") == model), {})
    vocab_size = args.vocab_size or card.get("vocab_size")
    endpoint = Endpoint(
        url=base_url + (args.endpoint or BACKENDS[args.backend]),
        model=model,
        chat=args.backend == "openai-chat",
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        extra_body=options.extra_body,
    )
    return endpoint, vocab_size


async def warm_up(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    requests: list[SampleRequest],
    max_concurrency: int | None,
) -> None:
    """Send the warm-up requests at once, unmeasured."""
    warmups, num = requests, len(requests)
    print(f"Warming up with {num} requests...", flush=True)
    results, _ = await run_requests(
        client, endpoint, warmups, [0.0] * num, max_concurrency=max_concurrency
    )
    failed = [r.error for r in results if not r.success]
    if failed:
        print(f"warning: {len(failed)} warm-up requests failed: {failed[0]}", file=sys.stderr)


async def run_rate(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    requests: list[SampleRequest],
    rate: float,
    args: argparse.Namespace,
    options: Options,
) -> dict[str, Any]:
    """One measured run at `rate`; returns its result dict (configuration, metrics, lists)."""
    rng = np.random.default_rng([args.seed, 1])  # the same arrival draws for every rate
    arrivals = arrival_times_s(len(requests), rate, args.burstiness, rng)
    print(
        f"Request rate {rate:g} req/s, burstiness {args.burstiness:g}, max concurrency "
        f"{args.max_concurrency}: {len(requests)} requests to {endpoint.url}",
        flush=True,
    )
    with tqdm(total=len(requests), disable=args.disable_tqdm) as progress:
        results, duration_s = await run_requests(
            client,
            endpoint,
            requests,
            arrivals,
            max_concurrency=args.max_concurrency,
            progress=progress,
        )
    metrics = calculate_metrics(
        results,
        duration_s,
        percentiles=options.percentiles,
        goodput_slos_ms=options.slos_ms,
        metrics=options.metrics,
    )
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "label": args.label,
        "model_id": endpoint.model,
        "endpoint": endpoint.url,
        "dataset_name": args.dataset_name,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "goodput": {m.value: v for m, v in options.slos_ms.items()} or None,
        **metrics,
        "span_breakdown": span_breakdown(results),
        **per_request_lists(results),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The whole benchmark: one result dict per request rate (saved with --save-result)."""
    options = check_args(args)
    async with make_client(args.request_timeout_s) as client:
        endpoint, vocab_size = await connect(client, args, options)
        # every set before anything is sent: bad dataset flags fail first
        sets = [build_requests(args, options.prompt_type, vocab_size, i)
                for i in range(len(options.rates))]  # fmt: skip
        if args.num_warmups:
            warmups = build_requests(args, options.prompt_type, vocab_size, WARMUP_DRAW)
            await warm_up(client, endpoint, warmups, args.max_concurrency)
        results = []
        for rate, requests in zip(options.rates, sets, strict=True):
            result = await run_rate(client, endpoint, requests, rate, args, options)
            print_result(result, options.metrics, options.percentiles, args.breakdown)
            results.append(result)
    if args.save_result:
        save_results(
            results,
            result_dir=args.result_dir,
            result_filename=args.result_filename,
            label=args.label or f"pdray-{args.backend}-{args.dataset_name}",
            slos_ms=options.slos_ms,
            plots=options.plots,
        )
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns one result dict per request rate."""
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ConnectionError, ImportError) as e:
        sys.exit(f"error: {e}")
