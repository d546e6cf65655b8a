"""KV transfer: what crosses between a prefill engine and a decode engine, and the transport interface.

Data flow for one request (decode side owns the destination and decides what is applied):

  decode  reserve blocks under a lease -> Ticket(request_id, generation, destination blocks, deadline)
  prefill for each forward step, for each layer as soon as it is computed (consecutive layers that
          are ready together travel as one chunk):
              LayerChunk(header: layers, runs of (src block, dst block, n)) + KVPayload (where the
              chunk's K and V are: the sender's cache and its block ids, or a packed buffer)
          after the first token: Handoff(first token, sampler state, number of chunks sent)
  decode  applies a chunk only while the ticket (request_id, generation) is live, under its lock;
          complete when the Handoff arrived and every chunk it counts was applied -> admit.

Tensor-parallel engines: every rank holds the KV of its KV heads (`KVLayout.kv_heads`), so every
prefill rank is a sender and every decode rank a receiver. `kv_routes` says which heads go from
which prefill rank to which decode rank (each head once, from the lowest prefill rank holding it),
which re-shards the KV when the two sides use different tensor-parallel sizes; a chunk names its
heads, and each Handoff says how many prefill ranks send to that decode rank.

A transport only moves (header, payload) from sender to receiver: `local` (same process),
`ucx` (ucxx, across nodes or processes: the chunk's blocks packed into one buffer, one message),
`cuda_ipc` (the KV stays in the sender's GPU memory and the receiver copies it through CUDA IPC).
Whatever the fragmentation of the two block tables, the receiver applies a chunk with one
gather/scatter (`kernels.kv_copy`). Fencing lives in the receiver, so it is the same for all.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TransportKind(str, enum.Enum):
    LOCAL = "local"
    UCX = "ucx"
    CUDA_IPC = "cuda_ipc"


class FailurePolicy(str, enum.Enum):
    """What a decode engine does when a request's KV does not arrive (lease expiry, error)."""

    RECOMPUTE = "recompute"  # prefill the prompt on the decode engine itself (default)
    RETRY = "retry"  # hand the request back to the router for another prefill/decode pair
    FAIL = "fail"  # end the request with an error


def head_range(rank: int, size: int, total_heads: int) -> tuple[int, int]:
    """KV heads [start, stop) held by tensor-parallel rank `rank` of `size`: an equal share, or,
    with fewer heads than ranks, one head replicated on size / total_heads consecutive ranks."""
    if total_heads >= size:
        share = total_heads // size
        return rank * share, (rank + 1) * share
    head = rank // (size // total_heads)
    return head, head + 1


class KVLayout(BaseModel):
    """Shape of one rank's KV cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim],
    holding KV heads `kv_heads` of the model's `total_kv_heads` (all of them at tp_size 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = Field(description="torch dtype name, e.g. 'bfloat16'")
    total_kv_heads: int = Field(0, description="KV heads of the model; 0: num_kv_heads")
    tp_rank: int = 0
    tp_size: int = 1

    @model_validator(mode="before")
    @classmethod
    def _whole_model_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("total_kv_heads"):
            data = {**data, "total_kv_heads": data.get("num_kv_heads")}
        return data

    @classmethod
    def of(
        cls, kv_cache: torch.Tensor, tp_rank: int = 0, tp_size: int = 1, total_kv_heads: int = 0
    ) -> KVLayout:
        layers, _, blocks, block_size, heads, head_dim = kv_cache.shape
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        return cls(
            num_layers=layers, num_blocks=blocks, block_size=block_size, num_kv_heads=heads,
            head_dim=head_dim, dtype=dtype, total_kv_heads=total_kv_heads, tp_rank=tp_rank,
            tp_size=tp_size,
        )  # fmt: skip

    @property
    def kv_heads(self) -> tuple[int, int]:
        return head_range(self.tp_rank, self.tp_size, self.total_kv_heads)

    def compatible_with(self, other: KVLayout) -> bool:
        """Same model KV (layers, blocks, heads, dtype), whatever the tensor-parallel split."""
        keys = {"num_layers", "block_size", "head_dim", "dtype", "total_kv_heads"}
        return self.model_dump(include=keys) == other.model_dump(include=keys)


def _routes(
    total: int, src_rank: int, src_size: int, dst_size: int
) -> list[tuple[int, tuple[int, int]]]:
    start, stop = head_range(src_rank, src_size, total)
    if src_rank != 0 and head_range(src_rank - 1, src_size, total)[0] == start:
        return []  # a replica of the previous rank's head: that rank sends it
    routes = []
    for rank in range(dst_size):
        lo, hi = head_range(rank, dst_size, total)
        if max(start, lo) < min(stop, hi):
            routes.append((rank, (max(start, lo), min(stop, hi))))
    return routes


def kv_routes(src: KVLayout, dst_size: int) -> list[tuple[int, tuple[int, int]]]:
    """(decode rank, KV heads) that prefill rank `src` sends: each head of the model goes to every
    decode rank holding it, from the lowest prefill rank holding it."""
    return _routes(src.total_kv_heads, src.tp_rank, src.tp_size, dst_size)


def num_senders(src_size: int, dst: KVLayout) -> int:
    """How many of `src_size` prefill ranks send KV to decode rank `dst`."""
    return sum(
        any(
            rank == dst.tp_rank
            for rank, _ in _routes(dst.total_kv_heads, src, src_size, dst.tp_size)
        )
        for src in range(src_size)
    )


def gpu_uuid(tensor: torch.Tensor) -> str | None:
    """The UUID of the GPU holding `tensor` (one per physical GPU, whatever CUDA_VISIBLE_DEVICES
    says), or None off CUDA."""
    if not tensor.is_cuda:
        return None
    return str(torch.cuda.get_device_properties(tensor.device).uuid)


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
    receivers: list[KVDescriptor] = Field(description="one per decode rank, rank 0 first")

    @property
    def receiver(self) -> KVDescriptor:
        """Decode rank 0: it admits the request once every rank has its KV."""
        return self.receivers[0]


class LayerChunk(BaseModel):
    """Header of the KV of layers [layer, layer + num_layers) for one sequence's block runs; its
    payload (`KVPayload`) says where K and V of those layers and blocks are."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    generation: int
    seq_id: str
    layer: int = Field(description="first layer")
    num_layers: int = Field(1, ge=1)
    runs: list[tuple[int, int, int]] = Field(description="(src_block, dst_block, num_blocks)")
    kv_heads: tuple[int, int] | None = Field(
        None, description="the model's KV heads [start, stop) in the payload; None: all"
    )


class Handoff(BaseModel):
    """Sent after all chunks of a sequence: the first token and the sampling state to continue."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    generation: int
    seq_id: str
    num_chunks: int = Field(description="layer chunks sent; one of k layers counts k")
    sender_rank: int = Field(0, description="tensor-parallel rank of the prefill sender")
    num_senders: int = Field(1, description="prefill ranks sending to this decode rank")
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


@dataclass(frozen=True, slots=True)
class KVPayload:
    """Where a LayerChunk's K and V are, for the receiver's one gather/scatter: block `blocks[i]`
    of `kv` holds the chunk's i-th (source, destination) block pair (`block_pairs` order), layers
    [layer, layer + num_layers) of `kv` its layers, KV heads [heads[0], heads[1]) of `kv` its heads.

    `kv` [layers, 2, blocks, block_size, heads, head_dim] is the sender's whole KV cache
    (`payload.cache_payload`: local, and cuda_ipc through the IPC mapping) or a packed staging
    buffer [num_layers, 2, n, block_size, heads, head_dim] (`payload.packed_payload`: ucx).
    `blocks` is an int64 CPU tensor: the receiver checks it and moves it to its GPU together with
    the destination blocks."""

    kv: torch.Tensor
    blocks: torch.Tensor
    layer: int
    num_layers: int
    heads: tuple[int, int]

    @property
    def num_blocks(self) -> int:
        return self.blocks.numel()

    @property
    def num_bytes(self) -> int:
        block_size, _, head_dim = self.kv.shape[3:]
        num_heads = self.heads[1] - self.heads[0]
        per_block = block_size * num_heads * head_dim * self.kv.element_size()
        return self.num_layers * 2 * self.num_blocks * per_block


OnMessage = Callable[[Message, KVPayload | None], None]


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


def head_slice(chunk: LayerChunk, layout: KVLayout) -> slice:
    """Where the chunk's KV heads are in a cache of `layout` (ValueError if it lacks some)."""
    if chunk.kv_heads is None:
        return slice(None)
    start, stop = layout.kv_heads
    lo, hi = chunk.kv_heads
    if not start <= lo < hi <= stop:
        raise ValueError(f"KV heads {lo}..{hi - 1} are not in a cache of heads {start}..{stop - 1}")
    return slice(lo - start, hi - start)


class TransferError(RuntimeError):
    pass


class KVTransport(ABC):
    """Moves (message, payload) from a sender engine to a receiver engine.

    Receiver side: `listen(engine_id, kv_cache, on_message, layout)` starts delivering incoming
    messages to on_message (from a transport thread) and returns the descriptor peers connect
    with. A LayerChunk comes with one `KVPayload` (the sender's cache or a packed buffer that
    holds the chunk's K and V, of all its layers, blocks and heads), which the receiver scatters
    into its blocks with one kernel launch; other messages come with None. `layout` (default
    `KVLayout.of(kv_cache)`) says which KV heads a tensor-parallel rank's cache holds.
    Sender side: `register(kv_cache, layout)`, `connect(peer)`, `send(peer_id, message,
    payload)` with the chunk's `cache_payload` (None for other messages; may return before the
    bytes left), `flush(peer_id)` waits until everything sent to that peer was delivered or
    raises TransferError.
    """

    kind: TransportKind
    spec: tuple[str, dict] | None = None  # (kind, options) that make this transport again

    @abstractmethod
    def listen(
        self,
        engine_id: str,
        kv_cache: torch.Tensor,
        on_message: OnMessage,
        layout: KVLayout | None = None,
    ) -> KVDescriptor: ...

    @abstractmethod
    def register(self, kv_cache: torch.Tensor, layout: KVLayout | None = None) -> None: ...

    @abstractmethod
    def connect(self, peer: KVDescriptor) -> None: ...

    @abstractmethod
    def send(self, peer_id: str, message: Message, payload: KVPayload | None = None) -> None: ...

    @abstractmethod
    def flush(self, peer_id: str, timeout_s: float) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
