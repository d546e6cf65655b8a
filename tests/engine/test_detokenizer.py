from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pdray.engine.detokenizer import (
    IncrementalDetokenizer,
    find_stop_string,
    num_streamable_chars,
)

CORPUS = [
    "héllo wörld 你好 🙂",
    "hello world, the quick brown fox jumps over the lazy dog",
    "naïve café déjà vu, 你好世界, emoji 🙂🚀 and more",
    "The quick brown fox. A stop sequence ### ends here.",
]
SAMPLES = [
    "héllo wörld 你好 🙂",
    "naïve café 🚀🙂 你好世界 the end",
    "plain ascii text, with punctuation!",
    "  leading spaces and\nnewlines\n",
]


def _save_and_wrap(tokenizer: Tokenizer, tmp_path: Path) -> PreTrainedTokenizerFast:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return _save_and_wrap(tokenizer, tmp_path_factory.mktemp("byte_level"))


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return _save_and_wrap(tokenizer, tmp_path_factory.mktemp("metaspace"))


def _byte_to_char() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _one_token_per_byte(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    byte_to_char = _byte_to_char()
    vocab = tokenizer.get_vocab()
    return [vocab[byte_to_char[byte]] for byte in text.encode("utf-8")]


def _stream(
    tokenizer: PreTrainedTokenizerFast,
    prompt_ids: list[int],
    output_ids: list[int],
    skip_special_tokens: bool = True,
) -> tuple[IncrementalDetokenizer, list[str]]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detokenizer.add_token(token_id) for token_id in output_ids]
    return detokenizer, deltas


def test_multibyte_characters_span_several_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level.encode("🙂")
    assert len(ids) > 1
    assert byte_level.decode(ids[:1]).endswith("\ufffd")


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("prompt", ["", "Hi ", "你"])
def test_byte_level_stream_equals_full_decode(
    byte_level: PreTrainedTokenizerFast, text: str, prompt: str
) -> None:
    prompt_ids = byte_level.encode(prompt)
    output_ids = byte_level.encode(text)
    detokenizer, deltas = _stream(byte_level, prompt_ids, output_ids)
    assert detokenizer.output_text == byte_level.decode(output_ids) == text
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("text", SAMPLES)
def test_one_token_per_byte_never_emits_replacement(
    byte_level: PreTrainedTokenizerFast, text: str
) -> None:
    output_ids = _one_token_per_byte(byte_level, text)
    assert len(output_ids) == len(text.encode("utf-8"))
    detokenizer, deltas = _stream(byte_level, byte_level.encode("ab"), output_ids)
    assert detokenizer.output_text == text
    assert all("\ufffd" not in delta for delta in deltas)
    emoji_end = _one_token_per_byte(byte_level, "🙂")
    _, emoji_deltas = _stream(byte_level, [], emoji_end)
    assert emoji_deltas == ["", "", "", "🙂"]


def test_random_token_sequences_match_full_decode(byte_level: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    words = " ".join(SAMPLES).split(" ")
    for _ in range(30):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        output_ids = byte_level.encode(text)
        detokenizer, _ = _stream(byte_level, byte_level.encode(rng.choice(SAMPLES)), output_ids)
        assert detokenizer.output_text == byte_level.decode(output_ids) == text


def test_special_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    eos_id = byte_level.eos_token_id
    output_ids = [*byte_level.encode("hello"), eos_id, *byte_level.encode(" world")]
    skipped, _ = _stream(byte_level, [], output_ids, skip_special_tokens=True)
    assert skipped.output_text == byte_level.decode(output_ids, skip_special_tokens=True)
    assert skipped.output_text == "hello world"
    kept, _ = _stream(byte_level, [], output_ids, skip_special_tokens=False)
    assert kept.output_text == "hello</s> world"


def test_long_output_keeps_window_bounded(byte_level: PreTrainedTokenizerFast) -> None:
    text = "naïve café 🚀🙂 你好世界 " * 50
    output_ids = byte_level.encode(text)
    detokenizer = IncrementalDetokenizer(byte_level, [])
    for token_id in output_ids:
        detokenizer.add_token(token_id)
        assert len(detokenizer._window_ids) <= 16
    assert detokenizer.output_text == text


def test_out_of_vocab_ids_do_not_crash(byte_level: PreTrainedTokenizerFast) -> None:
    hello = byte_level.encode("hello")
    output_ids = [hello[0], 10**9, -1, 2**40, *hello[1:]]
    detokenizer, _ = _stream(byte_level, [], output_ids)
    assert detokenizer.output_text == "hello"


def test_invalid_utf8_run_still_flushes(byte_level: PreTrainedTokenizerFast) -> None:
    continuation_byte = _one_token_per_byte(byte_level, "é")[1]
    hello = byte_level.encode("hello")
    detokenizer, _ = _stream(byte_level, [], [continuation_byte] * 20 + hello)
    assert detokenizer.output_text.endswith("hello")
    assert detokenizer.output_text.count("\ufffd") == 20


@pytest.mark.parametrize("text", ["hello world the quick fox", "café déjà vu and more"])
def test_metaspace_keeps_spaces_between_tokens(
    metaspace: PreTrainedTokenizerFast, text: str
) -> None:
    output_ids = metaspace.encode(text)
    assert len(output_ids) > 3
    detokenizer, _ = _stream(metaspace, [], output_ids)
    assert detokenizer.output_text == metaspace.decode(output_ids) == text


def test_metaspace_first_output_token_gets_its_space_from_the_prompt(
    metaspace: PreTrainedTokenizerFast,
) -> None:
    prompt_ids = metaspace.encode("the quick")
    output_ids = metaspace.encode("brown fox")
    assert metaspace.convert_ids_to_tokens(output_ids[0]).startswith("▁")
    detokenizer, _ = _stream(metaspace, prompt_ids, output_ids)
    full = metaspace.decode(prompt_ids + output_ids)
    assert detokenizer.output_text == full[len(metaspace.decode(prompt_ids)) :] == " brown fox"


def test_find_stop_string_spanning_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    stops = ["###", "fox jumps"]
    output_ids = byte_level.encode("the fox jumps ### over")
    detokenizer = IncrementalDetokenizer(byte_level, [])
    found = None
    delta = ""
    for token_id in output_ids:
        delta = detokenizer.add_token(token_id)
        found = find_stop_string(detokenizer.output_text, len(delta), stops)
        if found is not None:
            break
    assert found == ("fox jumps", 4)
    assert len(delta) < len("fox jumps")
    assert detokenizer.output_text.startswith("the fox jumps")


def test_find_stop_string_window() -> None:
    assert find_stop_string("abc STOP", 2, ["STOP"]) == ("STOP", 4)
    assert find_stop_string("abc STOP", 4, ["STOP"]) == ("STOP", 4)
    assert find_stop_string("STOP abcdef", 3, ["STOP"]) is None
    assert find_stop_string("abc STOP", 0, ["STOP"]) is None
    assert find_stop_string("xx abc", 1, ["abc", "b"]) == ("abc", 3)
    assert find_stop_string("xx abcd", 2, ["bcd", "cd", "abcd"]) == ("abcd", 3)
    assert find_stop_string("xx ab", 2, ["ab", "abc"]) == ("ab", 3)
    assert find_stop_string("xx ab", 10, ["q", "x"]) == ("x", 0)
    assert find_stop_string("", 1, ["x"]) is None


def test_num_streamable_chars() -> None:
    assert num_streamable_chars("hello wor", ["world"]) == 6
    assert num_streamable_chars("hello world", ["world"]) == 11
    assert num_streamable_chars("hello w", ["xyz", "wa", "o w"]) == 6
    assert num_streamable_chars("hello w", ["xyz", "wa", "lo wx"]) == 3
    assert num_streamable_chars("abc", []) == 3
    assert num_streamable_chars("", ["abc"]) == 0
    assert num_streamable_chars("ab", ["abc"]) == 0
    assert num_streamable_chars("aab", ["aabx", "b"]) == 0


@pytest.mark.parametrize("clean_up", [False, True])
def test_rust_decode_only_where_it_equals_the_tokenizers_decode(
    byte_level: PreTrainedTokenizerFast, clean_up: bool
) -> None:
    """Without space clean-up the detokenizer decodes with the Rust tokenizer directly, and the
    text equals transformers' decode (special tokens skipped or kept); with clean-up it keeps
    transformers' decode."""
    original = byte_level.clean_up_tokenization_spaces
    byte_level.clean_up_tokenization_spaces = clean_up
    try:
        detokenizer = IncrementalDetokenizer(byte_level, [], True)
        assert (detokenizer._backend is None) == clean_up
        rng = random.Random(1)
        words = " ".join(SAMPLES).split(" ")
        for skip in (True, False):
            ids = byte_level.encode(" ".join(rng.choice(words) for _ in range(20)))
            ids[3:3] = [byte_level.eos_token_id]
            streamed, _ = _stream(byte_level, byte_level.encode("Hi "), ids, skip)
            assert streamed.output_text == byte_level.decode(ids, skip_special_tokens=skip)
    finally:
        byte_level.clean_up_tokenization_spaces = original
