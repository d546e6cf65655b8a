"""Incremental detokenization and stop-string search over the generated text.

Decoding one token at a time is wrong for most tokenizers: a byte-level BPE token may hold part
of a UTF-8 character, and SentencePiece-style tokens carry a leading-space marker whose rendering
depends on what precedes it. So each step decodes a short window of recent tokens twice, with
and without the new ones, and emits the difference. The window starts `prefix_offset` tokens in;
`read_offset` marks the end of what has been emitted. Both move forward once the decoded window
ends on a complete character, so each step decodes a bounded number of tokens.

Known differences from decoding all output ids at once: the first output tokens are decoded
after a few prompt tokens of context (so a leading-space marker renders as the space it is in
context, where a standalone decode may strip it). And when `_MAX_PENDING_TOKENS` tokens in a row
complete no text (invalid UTF-8, or special tokens being skipped), the window moves on anyway to
keep steps bounded: invalid bytes are emitted as the replacement characters decoding gave, and a
leading-space marker right after such a run may lose its context.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5
_MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = rust_decoder(tokenizer)
        self.output_text = ""
        self._window_ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)

    def add_token(self, token_id: int) -> str:
        """Appends one generated token; returns the text it completes (may be "")."""
        self._window_ids.append(token_id)
        try:
            new_text = self._decode(self._window_ids[self._prefix_offset :])
        except (OverflowError, IndexError, KeyError, TypeError, ValueError):
            self._window_ids.pop()
            return ""
        prefix_text = self._decode(self._window_ids[self._prefix_offset : self._read_offset])
        grew = len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR)
        num_pending = len(self._window_ids) - self._read_offset
        if not grew and num_pending < _MAX_PENDING_TOKENS:
            return ""
        delta = new_text[len(prefix_text) :]
        self.output_text += delta
        self._advance()
        return delta

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._window_ids)
        if self._prefix_offset > _PROMPT_CONTEXT_TOKENS:
            del self._window_ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)


def rust_decoder(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a fast tokenizer when its `decode` returns exactly what
    `tokenizer.decode` does: when the tokenizer does not clean up spaces, transformers' decode adds
    only argument handling (about 8 us a call, two calls a token) around it. Else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "decode"):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """Earliest stop string in `text` that ends within its last `num_new_chars` characters.

    Returns (stop string, start index in text), or None. Among matches starting at the same
    index, the shortest wins (it was complete first).
    """
    num_new_chars = min(num_new_chars, len(text))
    if num_new_chars <= 0:
        return None
    best: tuple[str, int] | None = None
    for stop in stops:
        if not stop:
            continue
        window_start = max(0, len(text) - num_new_chars - len(stop) + 1)
        start = text.find(stop, window_start)
        if start < 0:
            continue
        if best is None or (start, len(stop)) < (best[1], len(best[0])):
            best = (stop, start)
    return best


def num_streamable_chars(text: str, stops: list[str]) -> int:
    """Leading characters of `text` that no later text can turn into part of a stop string."""
    held_back = 0
    for stop in stops:
        for prefix_len in range(min(len(stop) - 1, len(text)), held_back, -1):
            if text.endswith(stop[:prefix_len]):
                held_back = prefix_len
                break
    return len(text) - held_back
