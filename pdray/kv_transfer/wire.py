"""KV transfer headers as JSON-ready dicts and back, for the transports that send them as JSON
(`cuda_ipc`, `ucx`).

A message is {"kind": "chunk" | "handoff" | "abort", "body": its fields, "b64": the names of its
bytes fields, which travel in base64}. A LayerChunk's block runs travel as one base64 string of
int64 triples: a fragmented block table makes many runs (every other block of an 8k prompt: 512
a chunk), and as nested JSON lists they made the sender's `send` of such a chunk take 0.46 ms on
the H200 host against 0.25 ms packed (docs/performance.md, "Where a one-GPU transfer's time
goes").
"""

from __future__ import annotations

import base64

import numpy as np

from pdray.kv_transfer.base import Handoff, LayerChunk, Message, TransferAbort
from pdray.kv_transfer.payload import runs_array

_KINDS: dict[str, type] = {"chunk": LayerChunk, "handoff": Handoff, "abort": TransferAbort}
_NAMES = {cls: name for name, cls in _KINDS.items()}


def to_wire(message: Message) -> dict:
    if isinstance(message, LayerChunk):
        body = dict(message)  # the fields as they are (model_dump would copy every run)
        body["runs"] = base64.b64encode(runs_array(message.runs).tobytes()).decode()
        return {"kind": "chunk", "body": body}
    body = message.model_dump()
    binary = [key for key, value in body.items() if isinstance(value, bytes)]
    for key in binary:
        body[key] = base64.b64encode(body[key]).decode()
    return {"kind": _NAMES[type(message)], "body": body, "b64": binary}


def from_wire(frame: dict) -> Message:
    """The message; ValueError (or a pydantic ValidationError) for a malformed frame."""
    cls, body = _KINDS[frame["kind"]], frame["body"]
    if cls is LayerChunk:
        packed = base64.b64decode(body["runs"], validate=True)
        if len(packed) % 24:
            raise ValueError("a chunk's runs are not int64 triples")
        flat = iter(np.frombuffer(packed, dtype=np.int64).tolist())
        chunk = LayerChunk.model_validate({**body, "runs": []})  # every other field checked
        chunk.runs = list(zip(flat, flat, flat, strict=True))
        return chunk
    for key in frame.get("b64", ()):
        body[key] = base64.b64decode(body[key])
    return cls.model_validate(body)
