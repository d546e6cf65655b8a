"""`echo` with `logprobs` on /v1/completions, in the shape lm-evaluation-harness's
`local-completions` sends and reads for loglikelihood (as vLLM answers it).

lm-eval sends {"model", "prompt": [token ids] or text, "max_tokens": 1 (0 in older versions),
"temperature": 0, "logprobs": 1, "echo": true, "seed": 1234} and reads, per choice sorted by
index, `logprobs.token_logprobs[ctxlen:-1]` (max_tokens 1: the generated token is last) and
whether each equals the best of `logprobs.top_logprobs` at its position.
"""

from __future__ import annotations

import math
from operator import itemgetter

import httpx
import pytest
from serving_utils import MODEL, assert_openai_error, parse_sse, serve, wait_idle

from pdray import LLM, SamplingParams
from pdray.entrypoints.openai.api import build_openai_app
from pdray.outputs import CompletionOutput, Logprob, RequestOutput

pytestmark = pytest.mark.anyio


def lm_eval_payload(prompt, max_tokens: int = 1) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def lm_eval_parse(body: dict, ctxlens: list[int], max_tokens: int = 1) -> list[tuple[float, bool]]:
    """lm-eval's parse_logprobs (max_tokens 1: `[ctxlen:-1]`; 0, older versions: `[ctxlen:]`)."""
    end = -1 if max_tokens == 1 else None
    results = []
    choices = sorted(body["choices"], key=itemgetter("index"))
    for choice, ctxlen in zip(choices, ctxlens, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:end]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:end]
        is_greedy = all(
            lp == max(top.values()) for lp, top in zip(token_logprobs, top_logprobs, strict=True)
        )
        results.append((sum(token_logprobs), is_greedy))
    return results


# -- response assembly, over a scripted backend ---------------------------------------------------


class FakeTokenizer:
    """Token i is the letter chr(ord('a') + i - 1); 0 is BOS, written "<s>"."""

    def encode(self, text: str, **_) -> list[int]:
        return [0] + [ord(ch) - ord("a") + 1 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("<s>" if i == 0 else chr(ord("a") + i - 1) for i in ids)


def letter(token_id: int) -> str:
    return FakeTokenizer().decode([token_id])


def entry(token_id: int, logprob: float, best: int, best_logprob: float) -> dict[int, Logprob]:
    """A position's logprobs as the engine gives them: its token, then the top-1."""
    rank = 1 if token_id == best else 2
    out = {token_id: Logprob(logprob, rank, letter(token_id))}
    out.setdefault(best, Logprob(best_logprob, 1, letter(best)))
    return out


class ScriptedBackend:
    """Answers every prompt with generated token 5 ("e", logprob -0.5), in two outputs: the
    first unfinished (no text yet), then the finished one. Prompt position j scores -j (the
    token itself the best at odd positions, else token 1 at -0.1); `broken` omits them."""

    max_model_len = 64
    vocab_size = 27

    def __init__(self, broken: bool = False):
        self.broken = broken
        self.params: list[SamplingParams] = []

    def prompt_logprobs(self, ids: list[int]) -> list[dict[int, Logprob] | None]:
        scores: list[dict[int, Logprob] | None] = [None]
        for j, t in enumerate(ids[1:], start=1):
            scores.append(entry(t, -float(j), t if j % 2 else 1, -float(j) if j % 2 else -0.1))
        return scores

    async def generate(self, request_id, prompt, params):
        self.params.append(params)
        scores = None if self.broken else self.prompt_logprobs(prompt)
        if params.prompt_logprobs is None:
            scores = None
        token_logprobs = [entry(5, -0.5, 5, -0.5)]
        for finished in (False, True):
            outputs = [
                CompletionOutput(
                    index=c,
                    text="e" if finished else "",
                    token_ids=[5] if finished else [],
                    logprobs=token_logprobs if finished else [],
                    finish_reason="length" if finished else None,
                )
                for c in range(params.n)
            ]
            out = RequestOutput(request_id, None, list(prompt), outputs, finished)
            out.prompt_logprobs = scores
            yield out

    async def abort(self, request_id: str) -> None:
        pass

    def tokenizer(self):
        return FakeTokenizer()


async def post(backend, body: dict) -> httpx.Response:
    app = build_openai_app(backend, model_name=MODEL)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # 500s are answered
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/completions", json=body)


def streamed_choices(text: str) -> dict[int, dict]:
    """Stream chunks merged per choice index: text and the logprobs lists concatenated."""
    merged: dict[int, dict] = {}
    for event in parse_sse(text):
        for c in event["choices"]:
            m = merged.setdefault(c["index"], {"index": c["index"], "text": "", "logprobs": None})
            m["text"] += c["text"]
            m["finish_reason"] = c["finish_reason"]
            if c["logprobs"] is not None:
                lps = m["logprobs"] = m["logprobs"] or {k: [] for k in c["logprobs"]}
                for key, values in c["logprobs"].items():
                    lps[key] += values
    return merged


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_only_returns_the_scored_prompt(stream):
    """max_tokens 0: the prompt's tokens alone; the first has no logprob."""
    backend = ScriptedBackend()
    prompt = [0, 3, 1, 2]  # "<s>cab"
    r = await post(backend, {**lm_eval_payload(prompt, max_tokens=0), "stream": stream})
    assert r.status_code == 200, r.text
    assert backend.params[0].max_tokens == 1 and backend.params[0].prompt_logprobs == 1
    if stream:
        (choice,) = streamed_choices(r.text).values()
    else:
        body = r.json()
        (choice,) = body["choices"]
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    assert choice["text"] == "<s>cab" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {
        "tokens": ["<s>", "c", "a", "b"],
        "token_logprobs": [None, -1.0, -2.0, -3.0],
        "top_logprobs": [None, {"c": -1.0}, {"a": -2.0}, {"b": -3.0}],
        "text_offset": [0, 3, 4, 5],
    }
    if not stream:
        assert lm_eval_parse(body, [1], max_tokens=0) == [(-6.0, True)]


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_then_one_generated_token_in_lm_eval_shape(stream):
    backend = ScriptedBackend()
    prompts = [[0, 3, 4, 2], [0, 1, 3]]  # "<s>cdb", "<s>ac"; position 2 of each is not greedy
    r = await post(backend, {**lm_eval_payload(prompts), "stream": stream})
    assert r.status_code == 200, r.text
    choices = list(streamed_choices(r.text).values()) if stream else r.json()["choices"]
    choices = sorted(choices, key=itemgetter("index"))
    assert [c["text"] for c in choices] == ["<s>cdbe", "<s>ace"]
    first = choices[0]["logprobs"]
    assert first["tokens"] == ["<s>", "c", "d", "b", "e"]
    assert first["token_logprobs"] == [None, -1.0, -2.0, -3.0, -0.5]
    assert first["top_logprobs"] == [None, {"c": -1.0}, {"d": -2.0, "a": -0.1}, {"b": -3.0},
                                     {"e": -0.5}]  # fmt: skip
    assert first["text_offset"] == [0, 3, 4, 5, 6]
    assert choices[1]["logprobs"]["token_logprobs"] == [None, -1.0, -2.0, -0.5]
    body = {"choices": choices}
    assert lm_eval_parse(body, [1, 2]) == [(-6.0, False), (-2.0, False)]
    assert lm_eval_parse(body, [3, 1]) == [(-3.0, True), (-3.0, False)]


async def test_echo_of_a_text_prompt_is_the_text_as_sent():
    backend = ScriptedBackend()
    r = await post(backend, {"prompt": "cab", "echo": True, "max_tokens": 1})
    (choice,) = r.json()["choices"]
    assert choice["text"] == "cabe" and choice["logprobs"] is None  # text echo, no logprobs
    assert backend.params[0].prompt_logprobs is None
    r = await post(backend, {"prompt": "cab", "echo": True, "max_tokens": 1, "logprobs": 0})
    (choice,) = r.json()["choices"]
    assert choice["text"] == "cabe"
    assert choice["logprobs"]["tokens"] == ["<s>", "c", "a", "b", "e"]  # the tokens: BOS too


async def test_every_choice_starts_with_the_prompt():
    backend = ScriptedBackend()
    r = await post(backend, {**lm_eval_payload([0, 2, 3]), "n": 2, "temperature": 1.0})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["text"] == "<s>bce" for c in choices)
    assert all(c["logprobs"]["token_logprobs"] == [None, -1.0, -2.0, -0.5] for c in choices)


async def test_infinite_logprobs_are_sent_as_minus_9999():
    backend = ScriptedBackend()
    scores = backend.prompt_logprobs

    def with_inf(ids):
        out = scores(ids)
        out[1] = {ids[1]: Logprob(-math.inf, 27, letter(ids[1])), 1: Logprob(0.0, 1, "a")}
        return out

    backend.prompt_logprobs = with_inf
    r = await post(backend, lm_eval_payload([0, 3, 2]))
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][1] == -9999.0
    assert logprobs["top_logprobs"][1] == {"c": -9999.0, "a": 0.0}


async def test_max_tokens_0_needs_echo_and_missing_prompt_scores_are_a_500(caplog):
    backend = ScriptedBackend()
    assert_openai_error(await post(backend, {"prompt": [0, 1], "max_tokens": 0}), 400, "max_tokens")
    body = {**lm_eval_payload([0, 1], max_tokens=0), "min_tokens": 1}
    assert_openai_error(await post(backend, body), 400, "min_tokens")
    error = assert_openai_error(
        await post(ScriptedBackend(broken=True), lm_eval_payload([0, 1])), 500
    )
    assert "prompt logprobs" not in error["message"] and "request id cmpl-" in error["message"]
    assert "returned no prompt logprobs for 2 prompt tokens" in caplog.text


# -- end to end: the local server against the offline engine --------------------------------------


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(str(checkpoint("llama3")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def base_url(backend):
    with serve(build_openai_app(backend, model_name=MODEL)) as url:
        yield url


@pytest.mark.parametrize("max_tokens", [0, 1])
async def test_lm_eval_loglikelihood_request_equals_offline_prompt_logprobs(
    base_url, llm, engine, max_tokens
):
    texts = ["The capital of France is Paris", "hello world, hello"]
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(t) for t in texts]
    expected = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False
    )
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        by_ids = await client.post("/v1/completions", json=lm_eval_payload(prompts, max_tokens))
        by_text = await client.post("/v1/completions", json=lm_eval_payload(texts, max_tokens))
    for r in (by_ids, by_text):
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=itemgetter("index"))
        assert len(choices) == len(prompts)
        for choice, ids, out in zip(choices, prompts, expected, strict=True):
            logprobs = choice["logprobs"]
            num_tokens = len(ids) + max_tokens
            assert all(len(logprobs[k]) == num_tokens for k in logprobs)
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            for j in range(1, len(ids)):
                scored = out.prompt_logprobs[j]
                assert logprobs["tokens"][j] == scored[ids[j]].decoded_token
                assert logprobs["token_logprobs"][j] == pytest.approx(
                    scored[ids[j]].logprob, abs=1e-4
                )
                best = min(scored.values(), key=lambda lp: lp.rank)
                top = logprobs["top_logprobs"][j]
                assert top[best.decoded_token] == pytest.approx(best.logprob, abs=1e-4)
                assert set(top) <= {best.decoded_token, scored[ids[j]].decoded_token}
            generated = out.outputs[0]
            if max_tokens == 1:
                assert logprobs["tokens"][-1] == tokenizer.decode(generated.token_ids)
                assert choice["text"].endswith(generated.text)
            offsets = logprobs["text_offset"]
            assert offsets == [sum(map(len, logprobs["tokens"][:j])) for j in range(num_tokens)]
        ctxlens = [3, 2]
        parsed = lm_eval_parse({"choices": choices}, ctxlens, max_tokens)
        for (total, _), ids, out, ctxlen in zip(parsed, prompts, expected, ctxlens, strict=True):
            want = sum(out.prompt_logprobs[j][ids[j]].logprob for j in range(ctxlen, len(ids)))
            assert total == pytest.approx(want, abs=1e-3)
    await wait_idle(engine)
