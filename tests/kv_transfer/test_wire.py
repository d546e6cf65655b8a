"""KV transfer headers through the JSON wire form (`pdray.kv_transfer.wire`) and back."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pdray.kv_transfer.base import Handoff, LayerChunk, TransferAbort
from pdray.kv_transfer.wire import from_wire, to_wire


def _through_json(message):
    return from_wire(json.loads(json.dumps(to_wire(message))))


@pytest.mark.parametrize("runs", [[(0, 64, 512)], [(i, 64 + 2 * i, 1) for i in range(512)], []])
def test_a_chunk_comes_back_equal(runs):
    chunk = LayerChunk(request_id="r", generation=3, seq_id="r-0", layer=4, num_layers=28,
                       runs=runs, kv_heads=(2, 4))  # fmt: skip
    back = _through_json(chunk)
    assert back == chunk and back.runs == runs and all(type(r) is tuple for r in back.runs)
    # the sender's unvalidated chunks travel the same way
    assert _through_json(LayerChunk.model_construct(**dict(chunk))) == chunk


def test_handoff_and_abort_come_back_equal():
    handoff = Handoff(request_id="r", generation=1, seq_id="r-0", num_chunks=32,
                      first_token_id=7, logprob=-0.5, top_logprobs=[(7, -0.5), (9, -1.0)],
                      sampler_state=bytes(range(256)))  # fmt: skip
    abort = TransferAbort(request_id="r", generation=1, reason="gone")
    assert _through_json(handoff) == handoff and _through_json(abort) == abort


def test_malformed_chunks_are_refused():
    frame = to_wire(LayerChunk(request_id="r", generation=1, seq_id="s", layer=0, runs=[(0, 0, 1)]))
    with pytest.raises(ValueError, match="triples"):
        from_wire({**frame, "body": {**frame["body"], "runs": "AAAA"}})  # 3 bytes
    with pytest.raises(ValidationError):
        from_wire({**frame, "body": {**frame["body"], "num_layers": 0}})
