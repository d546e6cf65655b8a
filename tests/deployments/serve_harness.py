"""Runs the app for the serve tests: `serve run` on a copy of serve_config.yaml (tiny checkpoint,
CPU, 2 prefill + 2 decode replicas over UCX) on a Ray head that this process starts with a known
metrics export port, so tests can read the Prometheus endpoint and kill replica actors. Also
reads that endpoint and the replicas' Redis records.

`PDRAY_TEST_OVERLAP_PREFILL=1` runs the app with `overlap_prefill: true` (off by default). Known
failure with it (4 runs of 4): `test_serve_app.py::test_decode_replica_killed_mid_run` (see
docs/performance.md, issue 13, "overlap_prefill after a decode replica dies")."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import openai
import ray
import redis
import yaml
from prometheus_client import parser as prometheus_parser

from pdray.router.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
WARMUP_PROMPT = [5, 6, 7, 8]
METRICS_REPORT_INTERVAL_S = 0.5
MAX_MODEL_LEN = 2048  # long streams: they must outlast the kill test's set-up on a fast machine


def run_app(
    path: Path, tmp_dir: Path, replicas: int = 2, tensor_parallel: tuple[int, int] = (1, 1),
    mixed: int = 0,
):  # fmt: skip
    """Start Redis, Ray and the app (`replicas` prefill and decode, of tensor-parallel sizes
    `tensor_parallel`; or, with `mixed`, that many mixed replicas alone); yield what tests need;
    stop all three."""
    redis_server = RedisServer()
    redis_url = redis_server.start()
    metrics_port, http_port = free_port(), free_port()
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    # lease_s: KV held up by a replica's death (a prefill replica blocks while it fails to reach
    # a dead decode one) is recomputed on decode after 5 s rather than 30
    args.update(model=str(path), device="cpu", dtype="float32", redis_url=redis_url,
                scheduler_ttl_s=3, lease_s=5)  # fmt: skip
    if os.environ.get("PDRAY_TEST_OVERLAP_PREFILL") == "1":  # the optional overlap path
        args["overlap_prefill"] = True
    for role, tp in zip(("prefill", "decode"), tensor_parallel, strict=True):
        args[role]["replicas"] = 0 if mixed else replicas
        args[role]["tensor_parallel_size"] = tp
        args[role]["engine_args"] = {"num_kv_blocks": 1024, "max_model_len": MAX_MODEL_LEN}
    if mixed:
        args["mixed"] = {"replicas": mixed, "engine_args": args["decode"]["engine_args"]}
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config_path = tmp_dir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_dir / "serve.log"
    proc = None
    try:
        context = ray.init(
            address="local",  # a new Ray instance, even when `ray start` runs on this machine
            num_cpus=8,  # logical: the replicas, the router and Serve's actors fit on 2 cores
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": int(METRICS_REPORT_INTERVAL_S * 1e3)},
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONUNBUFFERED"] = "1"
        serve_cli = Path(sys.executable).parent / "serve"
        gcs_address = context.address_info["gcs_address"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(serve_cli), "run", "--address", gcs_address, str(config_path)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        server = {
            "client": openai.OpenAI(
                base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0
            ),
            "model": str(path),
            "redis_url": redis_url,
            "base_url": f"http://127.0.0.1:{http_port}",
            "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
            "serve_run": proc,
        }
        _wait_ready(server, proc, log_path, num_records=mixed or 2 * replicas)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        ray.shutdown()
        # serve.get_deployment_handle caches the Serve client of this Ray instance; the next
        # module's app runs in a new instance, whose controller the cached client cannot reach
        from ray.serve import context as serve_context

        serve_context._set_global_client(None)
        redis_server.stop()


def _wait_ready(server, proc: subprocess.Popen, log_path: Path, num_records: int) -> None:
    """Until a completion succeeds and every replica has its Redis record."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            server["client"].completions.create(
                model=server["model"], prompt=WARMUP_PROMPT, max_tokens=1
            )
            if len(instance_records(server)) == num_records:
                return
        except Exception:
            pass
        time.sleep(1)
    raise RuntimeError("the app did not start:\n" + log_path.read_text()[-4000:])


def _stop(proc: subprocess.Popen) -> None:
    """Ask serve run to shut the app down; ray.shutdown() ends whatever is left anyway."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Scrape:
    """One read of the Prometheus endpoint: samples summed over the labels not asked for."""

    def __init__(self, text: str):
        self.samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for family in prometheus_parser.text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample_labels, value in self.samples.get(name, [])
            if all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        """Sum of `name` per value of `label`."""
        totals: dict[str, float] = defaultdict(float)
        for sample_labels, value in self.samples.get(name, []):
            totals[sample_labels.get(label, "")] += value
        return dict(totals)


def scrape(server) -> Scrape:
    with urllib.request.urlopen(server["metrics_url"], timeout=10) as response:
        return Scrape(response.read().decode())


def settled_scrape(server, *names: str, quiet_s: float = 1.5, timeout_s: float = 30.0) -> Scrape:
    """A scrape after the totals of `names` did not change for `quiet_s` (replicas update their
    metrics every heartbeat, 1 s here; Ray ships them every METRICS_REPORT_INTERVAL_S)."""
    last = scrape(server)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(quiet_s)
        now = scrape(server)
        if all(now.value(name) == last.value(name) for name in names):
            return now
        last = now
    raise AssertionError(f"{names} kept changing for {timeout_s}s")


def instance_records(server) -> dict[str, dict]:
    """The live Redis records of the app's replicas, by instance id."""
    records = {}
    with redis.Redis.from_url(server["redis_url"]) as client:
        for key in client.keys("pdray:*:instance:*"):
            value = client.get(key)
            if value is not None:  # expired since KEYS
                record = json.loads(value)
                records[record["instance_id"]] = record
    return records


class StreamFailed(NamedTuple):
    """A streamed request that ended in an error, with the text streamed before it."""

    text: str
    error: Exception


def async_client(server, timeout_s: float = 120.0):
    import openai

    base_url = f"{server['base_url']}/v1"
    return openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s)


async def stream_text(aclient, model: str, prompt: list[int], max_tokens: int, on_chunk=None):
    """The streamed text of a greedy completion, or StreamFailed with what came before the error.
    `on_chunk(text so far)` runs per chunk; when it returns True the client stops reading."""
    import httpx
    import openai

    text = ""
    try:
        chunks = await aclient.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async with chunks:
            async for chunk in chunks:
                text += chunk.choices[0].text if chunk.choices else ""
                if on_chunk is not None and on_chunk(text):
                    break
        return text
    except (openai.APIError, httpx.HTTPError) as e:
        return StreamFailed(text, e)


@functools.cache
def _offline_llm(model: str):
    from pdray import LLM

    return LLM(model, device="cpu", dtype="float32")


def offline(model: str, prompts, params) -> list:
    """The offline engine's CompletionOutput per prompt (one engine per model, kept)."""
    outputs = _offline_llm(model).generate(prompts, params, use_tqdm=False)
    return [o.outputs[0] for o in outputs]


def offline_texts(model: str, prompts, max_tokens: int) -> list[str]:
    """The offline engine's greedy texts (ignore_eos) per prompt."""
    from pdray import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.text for o in offline(model, prompts, params)]


def assert_completions_equal_offline(server, prompts, max_tokens: int) -> list[str]:
    """Greedy completions over HTTP equal the offline engine's; the offline texts."""
    client, model = server["client"], server["model"]
    want = offline_texts(model, prompts, max_tokens)
    for prompt, expected in zip(prompts, want, strict=True):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.choices[0].text == expected
    return want


def wait_all_blocks_free(server, timeout_s: float = 10.0, replicas=frozenset()) -> None:
    """Until the heartbeats show every KV block free on every instance, and the records of
    `replicas` are all present (a record that expired says nothing), else fail."""
    deadline = time.time() + timeout_s
    while True:
        records = instance_records(server)
        free = {
            i: (r["role"], r["free_kv_blocks"], r["total_kv_blocks"]) for i, r in records.items()
        }
        missing = set(replicas) - set(records)
        if not missing and all(f == t for _, f, t in free.values()):
            return
        assert time.time() < deadline, (
            f"KV blocks still taken after {timeout_s} s: {free}; no record of {missing}"
        )
        time.sleep(0.2)


def replica_actor(name_part: str):
    """The actor of the Serve replica whose actor name contains `name_part` (`#<replica id>`,
    or `#Router#`), and its name."""
    names = ray.util.list_named_actors(all_namespaces=True)
    named = [a for a in names if name_part in a["name"]]
    assert len(named) == 1, (name_part, names)
    return ray.get_actor(named[0]["name"], namespace=named[0]["namespace"]), named[0]["name"]


async def kill_and_wait_dead(actor) -> None:
    """Kill the actor for good (Serve starts a new replica) and return once calls to it fail."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            await asyncio.wait_for(actor.__ray_ready__.remote(), 5)
        except Exception:
            return
        assert time.monotonic() < deadline, "the killed actor still answers after 30 s"
        await asyncio.sleep(0.05)
