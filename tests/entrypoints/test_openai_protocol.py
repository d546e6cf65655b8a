"""Request models -> SamplingParams, error parameters, and the streaming delta cursor."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdray.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    InvalidRequestError,
)
from pdray.entrypoints.openai.streams import Cursor
from pdray.outputs import CompletionOutput

USER = [{"role": "user", "content": "hi"}]


def test_completion_request_maps_to_sampling_params():
    body = CompletionRequest.model_validate_json(
        '{"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 5, "temperature": 0, "top_k": 4,'
        ' "stop": "x", "logprobs": 2, "seed": 3, "n": 2, "repetition_penalty": 1.1,'
        ' "presence_penalty": 0.5, "ignore_eos": true, "unknown_field": {"a": 1}}'
    )
    params = body.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_k, params.stop) == (5, 0, 4, ["x"])
    assert (params.logprobs, params.seed, params.n, params.ignore_eos) == (2, 3, 2, True)
    assert (params.repetition_penalty, params.presence_penalty) == (1.1, 0.5)
    assert CompletionRequest(prompt="a").to_sampling_params().max_tokens == 16  # OpenAI default
    assert CompletionRequest(prompt="a").to_sampling_params().temperature == 1.0


def test_chat_request_token_limits_and_logprobs():
    chat = ChatCompletionRequest(messages=USER)
    assert chat.to_sampling_params().max_tokens is None  # up to the context length
    assert ChatCompletionRequest(messages=USER, max_tokens=7).to_sampling_params().max_tokens == 7
    body = ChatCompletionRequest(messages=USER, max_completion_tokens=9, logprobs=True)
    assert body.to_sampling_params().max_tokens == 9
    assert body.to_sampling_params().logprobs == 0
    body = ChatCompletionRequest(messages=USER, logprobs=True, top_logprobs=5)
    assert body.to_sampling_params().logprobs == 5
    with pytest.raises(InvalidRequestError) as e:
        ChatCompletionRequest(
            messages=USER, max_tokens=3, max_completion_tokens=4
        ).to_sampling_params()
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_p": 1.5}, "top_p"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-2]}, "stop_token_ids"),
    ],
)
def test_value_errors_name_the_request_field(body, param):
    with pytest.raises(InvalidRequestError) as e:
        ChatCompletionRequest(messages=USER, **body).to_sampling_params()
    assert e.value.param == param and str(e.value).startswith(f"`{param}`")


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "a", "temperature": "0.5"}',
        '{"prompt": "a", "n": 1.5}',
        '{"prompt": "a", "n": true}',
        '{"prompt": [1.0, 2.0]}',
        '{"prompt": "a", "stop": 3}',
        '{"prompt": "a", "stream_options": {"include_usage": "yes"}}',
    ],
)
def test_wrong_types_are_rejected_not_coerced(raw):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json(raw)


def test_error_response_shape():
    body = ErrorResponse.model_validate(
        {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    )
    assert body.model_dump(mode="json") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }


def out(text: str, num_tokens: int, finish_reason: str | None = None) -> CompletionOutput:
    return CompletionOutput(0, text, list(range(num_tokens)), finish_reason=finish_reason)


def test_cursor_sends_each_piece_once_and_holds_back_possible_stops():
    cursor = Cursor()
    stops = ["STOP"]
    assert cursor.advance(out("ab", 1), stops).text == "ab"
    assert cursor.advance(out("ab", 1), stops) is None  # nothing new
    assert cursor.advance(out("abST", 2), stops) is None  # "ST" may start a stop string
    delta = cursor.advance(out("abSTx", 3), stops)  # it did not
    assert (delta.text, delta.token_start, delta.token_end) == ("STx", 1, 3)
    assert cursor.advance(out("abSTxS", 4), stops) is None
    delta = cursor.advance(out("abSTx", 5, "stop"), stops)  # the engine cut the stop string
    assert (delta.text, delta.finish_reason, delta.token_start) == ("", "stop", 3)
    assert cursor.advance(out("abSTx", 5, "stop"), stops) is None  # done


def test_cursor_without_stops_sends_everything_at_once():
    cursor = Cursor()
    assert cursor.advance(out("", 1), []) is None  # a token that completes no text yet
    delta = cursor.advance(out("é", 2), [])
    assert (delta.text, delta.token_start, delta.token_end) == ("é", 0, 2)
    delta = cursor.advance(out("é!", 3, "length"), [])
    assert (delta.text, delta.finish_reason) == ("!", "length")
