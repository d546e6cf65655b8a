"""Tokenizer loading: the checkpoint's own (tokenizer.json / tokenizer_config.json with its chat
template) through transformers, or the in-memory one of a dummy preset."""

from __future__ import annotations

from pathlib import Path

from pdray.models.loader import DUMMY_PREFIX


def load_tokenizer(model: str, tokenizer: str | None, vocab_size: int):
    source = tokenizer or model
    if source.startswith(DUMMY_PREFIX):
        from pdray.models.dummy import dummy_tokenizer

        return dummy_tokenizer(vocab_size)
    path = Path(source)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{source}: no tokenizer.json or tokenizer_config.json (pass tokenizer=<dir> to use another)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise ValueError(f"{source}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
