"""`serve run` on a copy of serve_config.yaml (tiny checkpoint, CPU, 1 prefill + 1 decode over UCX),
driven over HTTP with the official openai client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

openai = pytest.importorskip("openai")
redis = pytest.importorskip("redis")
pytest.importorskip("ray.serve")
pytest.importorskip("ucxx")

from pdray import LLM, SamplingParams  # noqa: E402
from pdray.router.redis_server import RedisServer, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36]]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama3")
    redis_server = RedisServer()
    redis_url = redis_server.start()
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args.update(model=str(path), device="cpu", dtype="float32", redis_url=redis_url,
                scheduler_ttl_s=3)  # fmt: skip
    for role in ("prefill", "decode"):
        args[role]["engine_args"] = {"num_kv_blocks": 256, "max_model_len": 256}
    http_port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config_path = tmp_path_factory.mktemp("serve") / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = open(config_path.parent / "serve.log", "w")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    serve_cli = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen(
        [str(serve_cli), "run", str(config_path)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            client.completions.create(model=str(path), prompt=PROMPTS[0], max_tokens=1)
            break
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(2)
    else:
        proc.kill()
    if proc.poll() is not None:
        log.close()
        pytest.fail("serve run exited:\n" + (config_path.parent / "serve.log").read_text()[-4000:])
    yield {"client": client, "model": str(path), "redis_url": redis_url, "base_url": base_url}
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    redis_server.stop()
    log.close()


def offline(model: str, prompts, params: SamplingParams):
    llm = LLM(model, device="cpu", dtype="float32")
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_completions_equal_offline_engine(server):
    client, model = server["client"], server["model"]
    want = offline(model, PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, expected in zip(PROMPTS, want, strict=True):
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.choices[0].text == expected.text
        assert out.usage.prompt_tokens == len(prompt)
        assert out.usage.completion_tokens == 12 == len(expected.token_ids)
        assert out.usage.total_tokens == len(prompt) + 12


def test_streamed_chat_equals_non_streamed(server):
    client, model = server["client"], server["model"]
    messages = [{"role": "user", "content": "hello there, how are you"}]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0
    )
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": [1, 2], "max_tokens": -3}, 400),
        ({"prompt": [1, 999999], "max_tokens": 3}, 400),
        ({"prompt": list(range(5, 300)), "max_tokens": 3}, 400),
        ({"prompt": [1, 2], "temperature": "hot"}, 400),
        ({"prompt": [1, 2], "model": "not-this-one"}, 404),
    ],
)
def test_bad_input_gets_openai_errors(server, body, status):
    import httpx

    payload = {"model": server["model"], **body}
    r = httpx.post(f"{server['base_url']}/v1/completions", json=payload, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and "type" in error and "param" in error and "code" in error


def test_48_concurrent_requests_and_redis_records(server):
    async def main():
        client = openai.AsyncOpenAI(
            base_url=f"{server['base_url']}/v1", api_key="none", max_retries=0
        )
        calls = [
            client.completions.create(model=server["model"], prompt=[5 + i, 6, 7], max_tokens=6)
            for i in range(48)
        ]
        return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    assert len(outs) == 48 and all(o.usage.completion_tokens >= 1 for o in outs)
    assert server["client"].completions.create(model=server["model"], prompt=[9, 9], max_tokens=2)
    keys = redis.Redis.from_url(server["redis_url"]).keys("pdray:*")
    assert len(keys) == 2  # one live record per engine replica (prefill, decode)
