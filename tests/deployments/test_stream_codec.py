"""A replica sends a stream's prompt once; the router restores it on every later output, so what
the router's consumers see equals what the engine emitted."""

from __future__ import annotations

import copy
import pickle

import pytest
from pdray.deployments.stream_codec import PromptElider, PromptRestorer

from pdray.outputs import CompletionOutput, Logprob, RequestOutput


def _out(tokens: list[int], scores=None, finished=False) -> RequestOutput:
    completion = CompletionOutput(
        0, "t" * len(tokens), tokens, finish_reason="length" if finished else None
    )
    return RequestOutput("r", "a prompt", list(range(2048)), [completion], finished,
                         prompt_logprobs=scores)  # fmt: skip


def _through_the_wire(outputs):
    elide, restore = PromptElider(), PromptRestorer()
    sent = [pickle.dumps(elide(copy.deepcopy(o))) for o in outputs]
    return sent, [restore(pickle.loads(b)) for b in sent]


def test_later_outputs_travel_without_the_prompt_and_come_back_equal():
    outputs = [_out([5]), _out([5, 6]), _out([5, 6, 7], finished=True)]
    sent, received = _through_the_wire(outputs)
    assert received == outputs
    assert all(len(b) < len(sent[0]) / 4 for b in sent[1:])  # the 2048 prompt ids went once


def test_prompt_logprobs_go_once_from_the_first_output_that_has_them():
    scores = [None] + [{i: Logprob(-1.0, 1)} for i in range(1, 2048)]
    outputs = [_out([5]), _out([5, 6], scores), _out([5, 6, 7], scores, finished=True)]
    sent, received = _through_the_wire(outputs)
    assert received == outputs
    assert len(sent[2]) < len(sent[1]) / 4


def test_non_output_items_pass_untouched():
    elide, restore = PromptElider(), PromptRestorer()
    ticket = {"request_id": "r"}
    assert elide(ticket) is ticket and restore(ticket) is ticket


def test_an_output_without_its_prompt_first_is_an_error():
    elide = PromptElider()
    elide(_out([5]))
    with pytest.raises(RuntimeError, match="without its prompt came first"):
        PromptRestorer()(elide(_out([5, 6])))
