"""Drives a PrefillWorker and a DecodeWorker in one process, like a router would."""

from __future__ import annotations

import itertools

from pdray.config import EngineConfig
from pdray.disagg.decode import DecodeWorker
from pdray.disagg.prefill import PrefillWorker
from pdray.engine.llm_engine import LLMEngine
from pdray.kv_transfer.local import LocalTransport

_ids = itertools.count()


def make_engine(path, role: str, **kwargs) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=str(path), device="cpu", dtype="float32", role=role, **kwargs)
    )


def make_pair(path, transport_factory=LocalTransport, *, prefill_kwargs=None, decode_kwargs=None,
              **worker_kwargs):  # fmt: skip
    prefill = PrefillWorker(
        make_engine(path, "prefill", **(prefill_kwargs or {})), transport_factory()
    )
    decode = DecodeWorker(
        make_engine(path, "decode", **(decode_kwargs or {})),
        transport_factory(),
        engine_id=f"decode-{next(_ids)}",
        **worker_kwargs,
    )
    return prefill, decode


def run(
    prefill: PrefillWorker, decode: DecodeWorker, prompts, params, *, max_steps=10_000, **reserve_kw
):
    """Reserve on decode, prefill with the ticket, step both until done; final outputs in order."""
    ids = [f"req-{next(_ids)}" for _ in prompts]
    for request_id, prompt in zip(ids, prompts, strict=True):
        ticket = decode.reserve(request_id, prompt, params, **reserve_kw)
        assert ticket is not None
        prefill.submit(request_id, prompt, params, ticket)
    final = {}
    for _ in range(max_steps):
        prefill.step()
        for out in decode.step():
            if out.finished:
                final[out.request_id] = out
        if len(final) + len(decode.events) == len(ids) and not decode.has_work():
            break
    return [final.get(request_id) for request_id in ids], ids


def assert_baseline(*engines: LLMEngine) -> None:
    for engine in engines:
        assert engine.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.requests
