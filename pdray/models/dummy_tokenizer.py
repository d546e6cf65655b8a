from __future__ import annotations

from collections import Counter
from functools import lru_cache
from itertools import pairwise

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, IM_START, IM_END)
MAX_MERGES = 512
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small language model reads the text
and writes the next word, one token at a time, until it reaches the end of the answer.
When you ask a question, the model looks at what you wrote and tries to give a clear,
short and helpful answer. It is not always right, but it can be very useful for many
people who want to learn about the world, write a letter, or read a long story.
In the morning the sun rises over the hills, and the birds sing in the trees near the
river. The children walk to school with their friends, and the teacher tells them about
the history of the old town, the people who lived there, and the work they did.
There is a house at the end of the road with a green door and a red roof. Every day an
old man sits in the garden and reads the news. He says that the weather will be good
this week, so we should go out and enjoy the time we have together with our family.
What is the capital of France? The capital of France is Paris. What is the largest
ocean on the planet? It is the Pacific Ocean. Which is the most common gas in the air
that we breathe? It is nitrogen, and after that there is oxygen.
Please write a short poem about the sea. The sea is deep and wide and blue, it holds
the light of the morning dew; the waves come in and go away, and the wind will sing
to them all day.
You are a helpful assistant. The user will ask you for help with a task, and you
should think about the problem step by step before you give the final answer.
This is an example of a simple program that prints a message to the screen when it
runs. First we define a function, then we call the function with a name, and the
function returns a string that says hello to the person with that name.
"""


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def _merge_word(word: tuple[str, ...], pair: tuple[str, str], joined: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(joined)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=4)
def _learn_merges(limit: int) -> tuple[tuple[str, str], ...]:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = Counter(piece for piece, _ in pre.pre_tokenize_str(CORPUS))
    words = {tuple(w): c for w, c in sorted(counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < limit:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        pair, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merges.append(pair)
        joined = pair[0] + pair[1]
        merged: dict[tuple[str, ...], int] = {}
        for word, c in words.items():
            new = _merge_word(word, pair, joined) if joined in "".join(word) else word
            merged[new] = merged.get(new, 0) + c
        words = merged
    return tuple(merges)


def _build_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens: list[str] = [*SPECIAL_TOKENS, *_byte_chars()]
    merges = list(_learn_merges(min(MAX_MERGES, vocab_size - len(tokens))))
    tokens.extend(a + b for a, b in merges)
    space = _byte_chars()[ord(" ")]
    tokens.extend(f"{space}w{i}" for i in range(len(tokens), vocab_size))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != vocab_size:
        raise AssertionError("duplicate tokens in dummy vocabulary")
    return vocab, merges


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Deterministic in-memory byte-level BPE tokenizer with exactly `vocab_size` ids."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    vocab, merges = _build_vocab(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
