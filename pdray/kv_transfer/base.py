"""KV transfer: what crosses between a prefill engine and a decode engine, and the transport interface.

Data flow for one request (decode side owns the destination and decides what is applied):

  decode  reserve blocks under a lease -> Ticket(request_id, generation, destination blocks, deadline)
  prefill for each forward step, for each layer as soon as it is computed (consecutive layers that
          are ready together travel as one chunk):
              LayerChunk(header: layers, runs of (src block, dst block, n)) + payload (K and V of the runs)
          after the first token: Handoff(first token, sampler state, number of chunks sent)
  decode  applies a chunk only while the ticket (request_id, generation) is live, under its lock;
          complete when the Handoff arrived and every chunk it counts was applied -> admit.

A transport only moves (header, payload) from sender to receiver: `local` (same process),
`ucx` (ucxx, across nodes or processes), `cuda_ipc` (payload stays in the sender's GPU memory and
the receiver copies it through CUDA IPC). Fencing lives in the receiver, so it is the same for all.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field


class TransportKind(str, enum.Enum):
    LOCAL = "local"
    UCX = "ucx"
    CUDA_IPC = "cuda_ipc"


class FailurePolicy(str, enum.Enum):
    """What a decode engine does when a request's KV does not arrive (lease expiry, error)."""

    RECOMPUTE = "recompute"  # prefill the prompt on the decode engine itself (default)
    RETRY = "retry"  # hand the request back to the router for another prefill/decode pair
    FAIL = "fail"  # end the request with an error


class KVLayout(BaseModel):
    """Shape of an engine's KV cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = Field(description="torch dtype name, e.g. 'bfloat16'")

    @classmethod
    def of(cls, kv_cache: torch.Tensor) -> KVLayout:
        layers, _, blocks, block_size, heads, head_dim = kv_cache.shape
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        return cls(
            num_layers=layers, num_blocks=blocks, block_size=block_size,
            num_kv_heads=heads, head_dim=head_dim, dtype=dtype,
        )  # fmt: skip

    def compatible_with(self, other: KVLayout) -> bool:
        mine = self.model_dump(exclude={"num_blocks"})
        return mine == other.model_dump(exclude={"num_blocks"})


class KVDescriptor(BaseModel):
    """How a peer reaches a receiver: exchanged in the handshake (crosses processes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    engine_id: str = Field(description="unique id of the receiving engine")
    transport: TransportKind
    layout: KVLayout
    address: str = Field(
        "", description="transport-specific: host:port for ucx, IPC handle for cuda_ipc"
    )
    host: str = Field("", description="node the receiver runs on (cuda_ipc needs the same node)")
    extra: dict = Field(default_factory=dict, description="transport-specific details")


class SeqTicket(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq_id: str
    block_table: list[int] = Field(description="decode blocks of the prompt, in order")
    num_cached_tokens: int = Field(description="prompt tokens decode already has (prefix hits)")


class Ticket(BaseModel):
    """A decode reservation: where one request's prompt KV must go, and until when."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    generation: int = Field(description="reservation generation: fences writes to old reservations")
    seqs: list[SeqTicket]
    deadline_s: float = Field(description="time.time() after which the lease expires")
    receiver: KVDescriptor


class LayerChunk(BaseModel):
    """Header of the KV of layers [layer, layer + num_layers) for one sequence's block runs; the
    payload holds, per run, K and V of those layers: [num_layers, 2, n, block_size, Hkv, D]."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    generation: int
    seq_id: str
    layer: int = Field(description="first layer")
    num_layers: int = Field(1, ge=1)
    runs: list[tuple[int, int, int]] = Field(description="(src_block, dst_block, num_blocks)")


class Handoff(BaseModel):
    """Sent after all chunks of a sequence: the first token and the sampling state to continue."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    generation: int
    seq_id: str
    num_chunks: int = Field(description="layer chunks sent; one of k layers counts k")
    first_token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    sampler_state: bytes | None = None


class TransferAbort(BaseModel):
    """The sender gave up on a ticket (prefill error, abort)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    generation: int
    reason: str


Message = LayerChunk | Handoff | TransferAbort
OnMessage = Callable[[Message, list[torch.Tensor]], None]


@dataclass(slots=True)
class BlockRun:
    src: int
    dst: int
    num_blocks: int


def merge_runs(src_blocks: list[int], dst_blocks: list[int]) -> list[BlockRun]:
    """Pair blocks up and merge pairs that are contiguous on both sides into runs."""
    runs: list[BlockRun] = []
    for src, dst in zip(src_blocks, dst_blocks, strict=True):
        last = runs[-1] if runs else None
        if last and src == last.src + last.num_blocks and dst == last.dst + last.num_blocks:
            last.num_blocks += 1
        else:
            runs.append(BlockRun(src, dst, 1))
    return runs


def run_payload(kv_cache: torch.Tensor, chunk: LayerChunk) -> list[torch.Tensor]:
    """Views of `kv_cache` holding the chunk's source runs (what a sender's payload is)."""
    layers = slice(chunk.layer, chunk.layer + chunk.num_layers)
    return [kv_cache[layers, :, src : src + n] for src, _, n in chunk.runs]


class TransferError(RuntimeError):
    pass


class KVTransport(ABC):
    """Moves (message, payload) from a sender engine to a receiver engine.

    Receiver side: `listen(kv_cache, on_message)` starts delivering incoming messages to
    on_message (from a transport thread) and returns the descriptor peers connect with.
    For LayerChunk, the payload is one tensor per run, [num_layers, 2, n, block_size, Hkv, D]
    (K and V of the chunk's layers); the receiver copies them into its blocks. Sender side: `register(kv_cache)`, `connect(peer)`,
    `send(peer_id, message, payload)` (may return before the bytes left), `flush(peer_id)` waits
    until everything sent to that peer was delivered or raises TransferError.
    """

    kind: TransportKind

    @abstractmethod
    def listen(
        self, engine_id: str, kv_cache: torch.Tensor, on_message: OnMessage
    ) -> KVDescriptor: ...

    @abstractmethod
    def register(self, kv_cache: torch.Tensor) -> None: ...

    @abstractmethod
    def connect(self, peer: KVDescriptor) -> None: ...

    @abstractmethod
    def send(self, peer_id: str, message: Message, payload: list[torch.Tensor]) -> None: ...

    @abstractmethod
    def flush(self, peer_id: str, timeout_s: float) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
