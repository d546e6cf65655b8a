"""The serving benchmark: metric arithmetic, arrivals, datasets, SSE handling, and whole runs
against a served tiny model."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import numpy as np
import pytest

from pdray.bench.serve import main
from pdray.bench.serve_client import Endpoint, arrival_times_s, run_requests, send_request, sse_data
from pdray.bench.serve_datasets import (
    PromptType,
    SampleRequest,
    length_range,
    random_requests,
    sharegpt_requests,
)
from pdray.bench.serve_metrics import (
    Metric,
    RequestResult,
    calculate_metrics,
    parse_goodput,
    parse_percentiles,
    per_request_lists,
    results_from_lists,
)

# -- metrics on synthetic timelines ---------------------------------------------------------------


def timelines() -> list[RequestResult]:
    """Four requests: 4 tokens, 2 tokens, 1 token, and a failure."""
    return [
        RequestResult(True, 10, 4, ttft_s=0.1, itl_s=[0.02, 0.03, 0.05], latency_s=0.2),
        RequestResult(True, 20, 2, ttft_s=0.3, itl_s=[0.1], latency_s=0.4),
        RequestResult(True, 30, 1, ttft_s=0.05, itl_s=[], latency_s=0.05),
        RequestResult(False, 40, 0, error="HTTP 503: busy"),
    ]


def test_metrics_of_known_timelines():
    m = calculate_metrics(timelines(), duration_s=2.0, percentiles=[50, 90, 99.9])
    assert (m["completed"], m["failed"], m["duration"]) == (3, 1, 2.0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 7)  # failures not counted
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    assert m["request_goodput"] is None
    # TTFT over completed requests: 100, 300, 50 ms
    assert m["mean_ttft_ms"] == pytest.approx(150)
    assert m["median_ttft_ms"] == pytest.approx(100)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt((50**2 + 150**2 + 100**2) / 3))
    assert m["p90_ttft_ms"] == pytest.approx(100 + 0.8 * 200)  # linear between 2nd and 3rd
    assert m["p50_ttft_ms"] == pytest.approx(100)
    # TPOT = (E2E - TTFT) / (tokens - 1), only for requests with > 1 token: 33.3 and 100 ms
    assert m["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    # ITL pooled over requests: 20, 30, 50, 100 ms
    assert m["mean_itl_ms"] == pytest.approx(50)
    assert m["median_itl_ms"] == pytest.approx(40)
    assert m["p99.9_itl_ms"] == pytest.approx(50 + 0.997 * 50)
    assert m["mean_e2el_ms"] == pytest.approx((200 + 400 + 50) / 3)


def test_tpot_is_mean_itl_when_each_chunk_is_one_token():
    r = RequestResult(True, 5, 5, ttft_s=0.5, itl_s=[0.01, 0.02, 0.03, 0.06], latency_s=0.62)
    assert r.tpot_s == pytest.approx(np.mean(r.itl_s)) == pytest.approx(0.03)
    assert RequestResult(True, 5, 1, ttft_s=0.5, latency_s=0.5).tpot_s == 0.0


def test_goodput_counts_requests_meeting_every_slo():
    slos = parse_goodput(["ttft:200", "tpot:50"])
    assert slos == {Metric.TTFT: 200.0, Metric.TPOT: 50.0}
    # request 1 meets both, request 2 misses TTFT, request 3 has one token (TPOT 0) and meets both
    assert calculate_metrics(timelines(), 2.0, goodput_slos_ms=slos)["request_goodput"] == 1.0
    slos[Metric.E2EL] = 100.0  # now request 1 (200 ms end to end) misses
    assert calculate_metrics(timelines(), 2.0, goodput_slos_ms=slos)["request_goodput"] == 0.5
    slos = parse_goodput(["tpot:40"])  # request 2's TPOT is 100 ms
    assert calculate_metrics(timelines(), 4.0, goodput_slos_ms=slos)["request_goodput"] == 0.5


@pytest.mark.parametrize("bad", ["ttft", "itl:5", "ttft:-1", "foo:1", "tpot:x"])
def test_goodput_rejects_bad_slos(bad):
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput([bad])


def test_percentiles_and_empty_samples():
    assert parse_percentiles("90, 99,99.9") == [90, 99, 99.9]
    for bad in ("", "0", "100", "x"):
        with pytest.raises(ValueError, match="--metric-percentiles"):
            parse_percentiles(bad)
    failed = [RequestResult(False, 7, error="boom")] * 3
    m = calculate_metrics(failed, 1.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"]) == (0, 3, 0)
    assert m["mean_ttft_ms"] == m["p99_itl_ms"] == m["std_e2el_ms"] == 0.0


def test_per_request_lists_round_trip():
    lists = per_request_lists(timelines())
    assert lists["output_lens"] == [4, 2, 1, 0] and lists["errors"][3] == "HTTP 503: busy"
    again = calculate_metrics(results_from_lists(json.loads(json.dumps(lists))), 2.0)
    assert again == calculate_metrics(timelines(), 2.0)


# -- arrivals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_follow_the_gamma_distribution(burstiness):
    rate, num = 8.0, 40_000
    times = arrival_times_s(num, rate, burstiness, np.random.default_rng(0))
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # gamma(shape k, mean 1/rate): variance = 1 / (rate^2 k), so the CV^2 is 1 / burstiness
    assert gaps.var() == pytest.approx(1 / (rate**2 * burstiness), rel=0.1)
    assert num / times[-1] == pytest.approx(rate, rel=0.03)


def test_infinite_rate_sends_everything_at_once():
    assert np.all(arrival_times_s(100, math.inf, 1.0, np.random.default_rng(0)) == 0)
    for rate, burstiness in [(0, 1), (-1, 1), (1, 0), (1, math.inf)]:
        with pytest.raises(ValueError):
            arrival_times_s(10, rate, burstiness, np.random.default_rng(0))


# -- datasets --------------------------------------------------------------------------------------


def rand(num, input_len, output_len, range_ratio, *, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return random_requests(
        num, input_len=input_len, output_len=output_len, range_ratio=range_ratio, rng=rng, **kwargs
    )


def test_random_lengths_fixed_and_ranged():
    fixed = rand(50, 32, 8, 0.0, vocab_size=100)
    assert all(r.prompt_len == len(r.prompt) == 32 for r in fixed)
    assert all(r.expected_output_len == 8 for r in fixed)
    assert all(0 <= t < 100 for r in fixed for t in r.prompt)

    assert length_range(100, 0.25) == (75, 125) and length_range(3, 0.9) == (1, 6)
    ranged = rand(400, 100, 40, 0.25, seed=1, vocab_size=100)
    inputs = [r.prompt_len for r in ranged]
    outputs = [r.expected_output_len for r in ranged]
    assert min(inputs) == 75 and max(inputs) == 125  # both ends are reached with 400 draws
    assert min(outputs) == 30 and max(outputs) == 50
    assert [len(r.prompt) for r in ranged] == inputs
    with pytest.raises(ValueError, match="range-ratio"):
        length_range(10, 1.0)


def test_random_prompts_are_seeded():
    def make(seed):
        return rand(4, 8, 4, 0.5, seed=seed, vocab_size=1000)

    assert make(7) == make(7) and make(7) != make(8)


@pytest.mark.parametrize("prompt_type", list(PromptType))
def test_prefix_sharing(prompt_type):
    requests = rand(
        6, 10, 4, 0.0, prompt_type=prompt_type, vocab_size=5000, prefix_len=16, num_prefixes=2
    )
    assert all(r.prompt_len == 26 for r in requests)
    tokens = [r.prompt.split() if prompt_type is PromptType.TEXT else r.prompt for r in requests]
    assert all(len(t) == 26 for t in tokens)
    prefixes = [tuple(t[:16]) for t in tokens]
    assert prefixes[0] == prefixes[2] == prefixes[4] != prefixes[1] == prefixes[3] == prefixes[5]
    assert len({tuple(t[16:]) for t in tokens}) == 6  # the rest differs


def test_token_ids_need_a_vocab_size():
    with pytest.raises(ValueError, match="--vocab-size"):
        rand(2, 4, 4, 0.0)
    text = rand(2, 4, 4, 0.0, prompt_type=PromptType.TEXT)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 4 for r in text)


def turn(who, text):
    return {"from": who, "value": text}


def test_sharegpt_parsing(tmp_path):
    path = tmp_path / "sharegpt.json"
    entries = [
        {"conversations": [turn("human", "a" * 40), turn("gpt", "b" * 80)]},
        {"conversations": [turn("human", "c" * 100), turn("gpt", "d" * 20), turn("human", "e")]},
        {"conversations": [turn("human", "only one turn")]},
        {"conversations": [turn("human", ""), turn("gpt", "empty prompt")]},
        {"conversations": [turn("human", "short"), turn("gpt", "x" * 40)]},  # 1-token prompt
        {"conversations": [turn("human", "f" * 8000), turn("gpt", "g" * 40)]},  # too long
        {"no conversations": []},
        "not a dict",
    ]
    path.write_text(json.dumps(entries))
    requests = sharegpt_requests(path, 5, np.random.default_rng(0))
    assert len(requests) == 5
    pairs = {(r.prompt, r.prompt_len, r.expected_output_len) for r in requests}
    assert pairs == {("a" * 40, 10, 20), ("c" * 100, 25, 5)}  # cycled over the two usable ones
    fixed = sharegpt_requests(path, 3, np.random.default_rng(0), output_len=7)
    assert {r.expected_output_len for r in fixed} == {7}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="--dataset-path"):
        sharegpt_requests(path, 1, np.random.default_rng(0))
    path.write_text(json.dumps(entries[2:]))
    with pytest.raises(ValueError, match="no usable conversation"):
        sharegpt_requests(path, 1, np.random.default_rng(0))


# -- SSE and the client, against fake transports ---------------------------------------------------


def sse_lines(*lines):
    async def gen():
        for line in lines:
            yield line

    return gen()


async def collect(agen):
    return [item async for item in agen]


def test_sse_parsing():
    lines = [
        ": comment",
        "event: message",
        'data:{"a": 1}',
        "",
        "",
        "data: x",
        "data: y\r",
        "id: 3",
        "",
        "data: tail",
    ]
    assert asyncio.run(collect(sse_data(sse_lines(*lines)))) == ['{"a": 1}', "x\ny", "tail"]


def chunk(text=None, usage=None, chat=False, finish=None):
    if text is None:
        return {"choices": [], "usage": usage}
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    return {"choices": [choice], "usage": usage}


def sse_body(*events, done=True, newline="\n"):
    parts = [f"data: {json.dumps(e)}{newline}{newline}" for e in events]
    if done:
        parts.append(f"data: [DONE]{newline}{newline}")
    return "".join(parts).encode()


def fake_client(handler):
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def send(handler, request=None, chat=False):
    endpoint = Endpoint(url="http://fake/v1/completions", model="m", chat=chat)
    request = request or SampleRequest([1, 2, 3], 3, 4)

    async def go():
        async with fake_client(handler) as client:
            return await send_request(client, endpoint, request)

    return asyncio.run(go())


def test_client_reads_a_stream_with_usage():
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    events = [
        chunk("He"),
        chunk(""),
        chunk("llo"),
        chunk(" world", finish="length"),
        chunk(None, usage),
    ]
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse_body(*events, newline="\r\n"))

    result = send(handler)
    assert result.success and result.error == ""
    assert result.generated_text == "Hello world"
    assert (result.output_tokens, result.prompt_len) == (4, 9)  # from usage, not chunk counts
    assert len(result.itl_s) == 2  # three chunks with text; the empty one is not a token arrival
    assert 0 < result.ttft_s <= result.latency_s
    body = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 4 and body["model"] == "m"


def test_client_times_chunks_as_they_arrive():
    async def slow_body():
        for i, text in enumerate(["a", "b", "c"]):
            await asyncio.sleep(0.1 if i == 0 else 0.05)
            yield sse_body(chunk(text), done=False)
        yield sse_body()

    result = send(lambda request: httpx.Response(200, content=slow_body()))
    assert result.success and result.output_tokens == 3  # no usage: one token per text chunk
    assert 0.1 <= result.ttft_s < 0.5
    assert len(result.itl_s) == 2 and all(0.05 <= gap < 0.45 for gap in result.itl_s)
    assert result.latency_s == pytest.approx(result.ttft_s + sum(result.itl_s))
    assert result.tpot_s == pytest.approx(np.mean(result.itl_s))


def test_client_chat_skips_the_role_chunk():
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        chunk("hi", chat=True),
        chunk(None, {"prompt_tokens": 2, "completion_tokens": 1}),
    ]
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse_body(*events))

    result = send(handler, SampleRequest("hello", 1, 3), chat=True)
    assert result.success and result.generated_text == "hi" and result.itl_s == []
    assert seen[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert seen[0]["max_completion_tokens"] == 3


@pytest.mark.parametrize(
    "response, error",
    [
        (
            httpx.Response(400, json={"error": {"message": "too long", "type": "x"}}),
            "HTTP 400: too long",
        ),
        (httpx.Response(200, content=sse_body(chunk("a"), {"error": {"message": "died"}})), "died"),
        (httpx.Response(200, content=sse_body(chunk("a"), done=False)), "before [DONE]"),
        (httpx.Response(200, content=b"data: {not json\n\n"), "JSONDecodeError"),
        (httpx.Response(200, content=b'data: {"choices": ["x"]}\n\n'), "AttributeError"),
    ],
)
def test_client_counts_failures(response, error):
    result = send(lambda request: response)
    assert not result.success and error in result.error


def test_client_connection_error_is_a_failure():
    def handler(request):
        raise httpx.ConnectError("refused")

    result = send(handler)
    assert not result.success and "ConnectError" in result.error


def test_run_requests_keeps_the_schedule_and_the_concurrency_limit():
    in_flight, most, sent_at = 0, 0, []

    async def handler(request):
        nonlocal in_flight, most
        sent_at.append(time.perf_counter())
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return httpx.Response(200, content=sse_body(chunk("x")))

    endpoint = Endpoint(url="http://fake/v1/completions", model="m")

    async def go(arrivals, max_concurrency):
        sent_at.clear()
        async with fake_client(handler) as client:
            start = time.perf_counter()
            results, duration_s = await run_requests(
                client,
                endpoint,
                [SampleRequest([1], 1, 1)] * len(arrivals),
                arrivals,
                max_concurrency=max_concurrency,
            )
        return results, duration_s, [t - start for t in sent_at]

    results, duration_s, offsets = asyncio.run(go([0.0, 0.15, 0.3], None))
    assert all(r.success for r in results) and duration_s >= 0.35
    assert [o >= a for o, a in zip(sorted(offsets), [0.0, 0.15, 0.3], strict=True)] == [True] * 3
    results, duration_s, _ = asyncio.run(go([0.0] * 8, 2))
    assert most == 2 and all(r.success for r in results)
    assert duration_s >= 4 * 0.05  # 8 requests, 2 at a time


# -- whole runs against a served tiny model --------------------------------------------------------

REQUIRED_KEYS = {
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "errors",
} | {
    f"{stat}_{metric}_ms"
    for stat in ("mean", "median", "std", "p90", "p99")
    for metric in ("ttft", "tpot", "itl", "e2el")
}


def test_random_run_end_to_end(served, tmp_path):
    url, engine = served.url, served.engine
    flags = (
        f"--base-url {url} --vocab-size 384 --dataset-name random --random-input-len 32 "
        "--random-output-len 12 --random-range-ratio 0.5 --num-prompts 8 --request-rate 40 "
        "--burstiness 0.5 --seed 3 --num-warmups 2 --ignore-eos --goodput ttft:60000 tpot:60000 "
        "--save-result --result-filename run.json --disable-tqdm"
    )
    [result] = main([*flags.split(), "--result-dir", str(tmp_path)])
    assert not REQUIRED_KEYS - set(result)
    assert result["model_id"] == served.model and result["request_rate"] == 40.0
    assert (result["completed"], result["failed"]) == (8, 0), result["errors"]
    expected = rand(8, 32, 12, 0.5, seed=3, vocab_size=384)  # what the flags above make
    assert result["output_lens"] == [r.expected_output_len for r in expected]
    assert len(set(result["output_lens"])) > 1  # the range ratio spread them
    assert result["input_lens"] == [r.prompt_len for r in expected]
    assert result["total_output_tokens"] == sum(result["output_lens"])
    assert result["errors"] == [""] * 8
    assert all(0 < t <= e for t, e in zip(result["ttfts"], result["e2els"], strict=True))
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0 and result["p99_itl_ms"] > 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["request_throughput"] == pytest.approx(8 / result["duration"])

    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (tmp_path / "run-latency-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not engine.requests and engine.num_free_blocks == engine.block_manager.num_blocks


def test_chat_sharegpt_sweep_end_to_end(served, tmp_path):
    url = served.url
    conversations = [
        {
            "conversations": [
                turn("human", f"Tell me about the river number {i}. " * 2),
                turn("gpt", "It is long. " * (i + 2)),
            ]
        }
        for i in range(5)
    ]
    (tmp_path / "sharegpt.json").write_text(json.dumps(conversations))
    flags = (
        f"--base-url {url} --backend openai-chat --dataset-name sharegpt "
        "--sharegpt-output-len 6 --num-prompts 6 --request-rates 30,inf --max-concurrency 3 "
        "--ignore-eos --save-result --result-filename sweep.json --disable-tqdm"
    )
    dirs = [
        "--dataset-path",
        str(tmp_path / "sharegpt.json"),
        "--result-dir",
        str(tmp_path / "out"),
    ]
    results = main([*flags.split(), *dirs])
    assert [r["request_rate"] for r in results] == [30.0, "inf"]
    for result in results:
        assert (result["completed"], result["failed"]) == (6, 0), result["errors"]
        assert result["output_lens"] == [6] * 6
        assert all(n > 10 for n in result["input_lens"])  # the server's count, chat template too
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names == {
        "sweep-30qps-concurrency3.json",
        "sweep-30qps-concurrency3-latency-cdf.png",
        "sweep-infqps-concurrency3.json",
        "sweep-infqps-concurrency3-latency-cdf.png",
        "sweep-sweep.json",
        "sweep-sweep.png",
    }
    summary = json.loads((out / "sweep-sweep.json").read_text())
    assert [s["completed"] for s in summary] == [6, 6] and "ttfts" not in summary[0]


def test_failures_are_counted(served, capsys):
    url = served.url
    flags = f"--base-url {url} --vocab-size 384 --random-input-len 600 --num-prompts 4"
    [result] = main(
        [*flags.split(), "--disable-tqdm"]
    )  # 600 tokens do not fit the 512-token context: the server says 400
    assert (result["completed"], result["failed"]) == (0, 4)
    assert all(e.startswith("HTTP 400") for e in result["errors"])
    assert result["request_throughput"] == 0 and result["mean_ttft_ms"] == 0
    assert "Failed requests:                         4" in capsys.readouterr().out


def test_bad_flags_fail_before_sending(served):
    url = served.url
    with pytest.raises(ValueError, match="--vocab-size"):
        main(["--base-url", url, "--num-prompts", "2", "--disable-tqdm"])
    with pytest.raises(ValueError, match="--prefix-len"):
        main(["--base-url", url, "--dataset-name", "prefix", "--prompt-type", "text"])
    with pytest.raises(ValueError, match="--prompt-type text"):
        main(["--base-url", url, "--backend", "openai-chat", "--prompt-type", "token-ids"])


@pytest.mark.parametrize("where", ["absolute", "subfolder", "bare"])
def test_result_filename_path_is_honoured(tmp_path, where):
    """`--result-filename` joined to `--result-dir` as vllm bench serve does."""
    from pdray.bench.serve_results import save_results

    result = {"request_rate": 2.0, "max_concurrency": None, "date": "20261130-000000"}
    name = {"absolute": str(tmp_path / "abs" / "run.json"), "subfolder": "sub/run.json",
            "bare": "run.json"}[where]  # fmt: skip
    [path] = save_results([result], result_dir=tmp_path / "dir", result_filename=name,
                          label="x", slos_ms={}, plots=False)  # fmt: skip
    want = {"absolute": tmp_path / "abs" / "run.json", "subfolder": tmp_path / "dir/sub/run.json",
            "bare": tmp_path / "dir" / "run.json"}[where]  # fmt: skip
    assert path == want and json.loads(path.read_text())["request_rate"] == 2.0


def test_each_rate_and_the_warm_ups_get_prompts_of_their_own():
    """A server with prefix caching must never see a measured prompt twice in one sweep: the
    warm-ups and every rate after the first are their own draws; the first rate is the seed's."""
    from pdray.bench.serve import WARMUP_DRAW, build_requests, parse_args

    args = parse_args(["--vocab-size", "384", "--random-input-len", "32", "--num-prompts", "6",
                       "--num-warmups", "3", "--seed", "3"])  # fmt: skip
    sets = {d: build_requests(args, PromptType.TOKEN_IDS, 384, d) for d in (0, 1, 2, WARMUP_DRAW)}
    assert [r.prompt for r in sets[0]] == [r.prompt for r in rand(6, 32, 128, 0.0, seed=3,
                                                                 vocab_size=384)]  # fmt: skip
    assert len(sets[WARMUP_DRAW]) == 3 and all(len(sets[d]) == 6 for d in (0, 1, 2))
    prompts = [tuple(r.prompt) for d in sets for r in sets[d]]
    assert len(set(prompts)) == len(prompts) == 21
    again = build_requests(args, PromptType.TOKEN_IDS, 384, 2)
    assert [r.prompt for r in again] == [r.prompt for r in sets[2]]  # seeded
