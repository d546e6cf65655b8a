"""A replica's output stream to the router, without repeating the prompt.

Engine outputs are cumulative and each carries the request's prompt: its text, its token ids
and, once scored, its prompt logprobs. Sent as they are, every token of a 2k-token prompt cost
about 9 KB of pickling on the replica and unpickling on the router (0.13 ms a token for the pair
on our CPU; the router relays every token of the app). So a replica sends the prompt with the
stream's first output only (and prompt logprobs with the first output that has them); later
outputs carry None there, and the router puts the prompt back before anything else sees them.
None is not a valid value of `prompt_token_ids` otherwise, so a missing prompt cannot be
mistaken for an empty one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pdray.outputs import RequestOutput


class PromptElider:
    """Replica side, one per stream: outputs after the first lose their copy of the prompt."""

    def __init__(self) -> None:
        self._sent_prompt = False
        self._sent_scores = False

    def __call__(self, item: Any) -> Any:
        if not isinstance(item, RequestOutput):
            return item
        scored = item.prompt_logprobs is not None
        if not self._sent_prompt:
            self._sent_prompt, self._sent_scores = True, scored
            return item
        slim = dataclasses.replace(item, prompt=None, prompt_token_ids=None)
        if self._sent_scores:
            slim.prompt_logprobs = None
        self._sent_scores = self._sent_scores or scored
        return slim


class PromptRestorer:
    """Router side, one per stream: fills in the prompt the replica left out."""

    def __init__(self) -> None:
        self._prompt: str | None = None
        self._ids: list[int] | None = None
        self._scores: list | None = None

    def __call__(self, item: Any) -> Any:
        if not isinstance(item, RequestOutput):
            return item
        if item.prompt_token_ids is None:
            if self._ids is None:
                raise RuntimeError(f"{item.request_id}: an output without its prompt came first")
            item.prompt, item.prompt_token_ids = self._prompt, self._ids
        else:
            self._prompt, self._ids = item.prompt, item.prompt_token_ids
        if item.prompt_logprobs is None:
            item.prompt_logprobs = self._scores
        else:
            self._scores = item.prompt_logprobs
        return item
