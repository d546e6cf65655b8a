"""Request sets of the serving benchmark: random, prefix-sharing random, and ShareGPT.

Prompts are token ids (sent as-is to /v1/completions, so their length is exact without a tokenizer)
or text. Text prompts of the random sets are made of common English words, about one token each
with BPE tokenizers; the server's usage reports the real count, which the benchmark uses. ShareGPT
prompts are text; without a tokenizer, a completion's length is estimated at 4 characters a token.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHARS_PER_TOKEN = 4  # the usual English estimate, for ShareGPT lengths without a tokenizer

# vLLM's ShareGPT filter: drop tiny pairs and prune long ones (in estimated tokens).
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "or has had not their one but have new first all two they after who been its more also she "
    "time can would other when into out some year over many only most up these world city state "
    "school people part three where used between during under known later while such each then "
    "water music river north south early game house family name team film work life group found "
    "small great long right light power line system place point order form number story"
)
WORDS = tuple(_WORD_TEXT.split())


class DatasetName(str, enum.Enum):
    RANDOM = "random"
    PREFIX = "prefix"
    SHAREGPT = "sharegpt"


class PromptType(str, enum.Enum):
    TOKEN_IDS = "token-ids"
    TEXT = "text"


@dataclass(slots=True)
class SampleRequest:
    """One benchmark request: its prompt and the lengths it was made with."""

    prompt: str | list[int]
    prompt_len: int  # tokens: exact for token ids, an estimate for text (usage replaces it)
    expected_output_len: int  # sent as max_tokens


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of lengths drawn around `length`: floor(length * (1 - ratio)) to
    ceil(length * (1 + ratio)), never below 1; ratio 0 gives exactly `length`."""
    if length < 1:
        raise ValueError(f"--random-input-len and --random-output-len must be >= 1, got {length}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(length * (1 - range_ratio)))
    return low, max(low, math.ceil(length * (1 + range_ratio)))


def sample_lengths(
    length: int, range_ratio: float, num: int, rng: np.random.Generator
) -> list[int]:
    low, high = length_range(length, range_ratio)
    return [int(n) for n in rng.integers(low, high + 1, size=num)]


def random_tokens(
    num_tokens: int, prompt_type: PromptType, rng: np.random.Generator, vocab_size: int | None
) -> list[int] | list[str]:
    """`num_tokens` random token ids below `vocab_size`, or as many random words."""
    if prompt_type is PromptType.TEXT:
        return [WORDS[i] for i in rng.integers(0, len(WORDS), size=num_tokens)]
    if not vocab_size:
        raise ValueError(
            "token-id prompts need the model's vocabulary size: pass --vocab-size N "
            "(the server's /v1/models does not report it), or use --prompt-type text"
        )
    return [int(i) for i in rng.integers(0, vocab_size, size=num_tokens)]


def random_requests(
    num_prompts: int,
    *,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    prompt_type: PromptType = PromptType.TOKEN_IDS,
    vocab_size: int | None = None,
    prefix_len: int = 0,
    num_prefixes: int = 1,
) -> list[SampleRequest]:
    """Random prompts of `prefix_len` shared tokens + a random part of about `input_len` tokens.

    With `prefix_len` > 0 there are `num_prefixes` distinct prefixes (a "system prompt" each),
    given to requests round-robin, so request i shares its prefix with requests i +- num_prefixes.
    """
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if prefix_len < 0 or num_prefixes < 1:
        raise ValueError(
            f"need --prefix-len >= 0 and --num-prefixes >= 1, got {prefix_len}, {num_prefixes}"
        )
    input_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    prefixes = [
        random_tokens(prefix_len, prompt_type, rng, vocab_size) for _ in range(num_prefixes)
    ]
    requests = []
    for i in range(num_prompts):
        tokens = prefixes[i % num_prefixes] + random_tokens(
            input_lens[i], prompt_type, rng, vocab_size
        )
        prompt = " ".join(tokens) if prompt_type is PromptType.TEXT else tokens
        requests.append(SampleRequest(prompt, prefix_len + input_lens[i], output_lens[i]))
    return requests


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every conversation with both, from a ShareGPT JSON
    file: a list of {"conversations": [{"from": ..., "value": ...}, ...]}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--dataset-path {path}: cannot read a ShareGPT JSON file ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if isinstance(prompt, str) and isinstance(reply, str) and prompt and reply:
            pairs.append((prompt, reply))
    return pairs


def sharegpt_requests(
    path: str | Path,
    num_prompts: int,
    rng: np.random.Generator,
    output_len: int | None = None,
) -> list[SampleRequest]:
    """`num_prompts` ShareGPT prompts in a seeded random order, repeated if the file has fewer.

    Output length: `output_len` when given, else the reply's estimated token count. Pairs outside
    vLLM's limits (in estimated tokens: each part >= 4, prompt <= 1024, both <= 2048) are dropped.
    """
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if output_len is not None and output_len < 1:
        raise ValueError(f"--sharegpt-output-len must be >= 1, got {output_len}")
    kept = []
    for prompt, reply in load_sharegpt(path):
        prompt_len = estimate_tokens(prompt)
        reply_len = output_len or estimate_tokens(reply)
        too_short = prompt_len < SHAREGPT_MIN_TOKENS or (
            output_len is None and reply_len < SHAREGPT_MIN_TOKENS
        )
        too_long = (
            prompt_len > SHAREGPT_MAX_PROMPT_TOKENS
            or prompt_len + reply_len > SHAREGPT_MAX_TOTAL_TOKENS
        )
        if not too_short and not too_long:
            kept.append(SampleRequest(prompt, prompt_len, reply_len))
    if not kept:
        raise ValueError(f"--dataset-path {path}: no usable conversation (need two turns of text)")
    order = rng.permutation(len(kept))
    return [kept[order[i % len(kept)]] for i in range(num_prompts)]
