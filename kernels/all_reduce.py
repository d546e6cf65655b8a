"""One-shot all-reduce over NVLink peer memory, for the small messages of tensor-parallel decode.

NCCL takes ~50 us for an 8 KB all-reduce on two H200s, and a decode step of an 8B model makes 65 of
them, which ate the whole gain of TP2 at batch 1 (docs/performance.md). Here every rank owns a
buffer that every other rank has mapped through CUDA IPC, and one kernel per all-reduce:

  program p of rank r:  copy its chunk of x into r's buffer (slot epoch % 2)
                        release-store flag[p][r] = epoch + 1 into every rank's flag array
                        spin (acquire) until every rank's flag[p][*] in its own array >= epoch + 1
                        sum the chunk over the ranks' buffers in rank order (fp32) -> x

Each program only reads the chunks that the same program index of the other ranks wrote before
signalling, so programs never wait on other programs of their own grid. Two slots suffice: a rank
reuses a slot two all-reduces later, which needs every peer's signal of the all-reduce between,
sent after that peer finished reading. Every rank sums in the same order, so all ranks get the
same bits (as with NCCL). The epoch lives on the device (one increment per call), so the kernel
replays inside CUDA graphs. A spin also reads an abort word in pinned host memory: when a peer
is lost, rank 0's watchdog sets it and kernels stuck waiting for that peer return.

`PeerAllReduce` sets the buffers up through the group's TCPStore; every rank must succeed or none
uses it (the ranks must take the same path for every call).

Status (two H200s, in CUDA graphs, 2026-11-30): equal to NCCL within rounding and bit-identical on
the ranks (tests/kernels/test_peer_all_reduce.py), 16.2 us against NCCL's 20.1 us for 8 KB, but
509 us against 21 us for 512 KB, so it is opt-in (`PDRAY_PEER_ALL_REDUCE=1`) until the large case
is understood (suspects: the sys-scope flag traffic of 128 programs, the .cg peer loads).
"""

from __future__ import annotations

import contextlib
import pickle

import torch
import triton
import triton.language as tl

MAX_BYTES = 1 << 20  # larger messages (prefill) go to NCCL, which is at bandwidth there
BLOCK = 2048
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _one_shot_all_reduce(
    x_ptr, n, table_ptr, epoch_ptr, slot_elems,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # table: [data base of rank 0..W-1, flag base of rank 0..W-1, abort word (pinned host)]
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr)
    target = epoch + 1
    slot = epoch % 2
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    elem = x_ptr.dtype.element_ty
    mine = tl.load(table_ptr + RANK).to(tl.pointer_type(elem))
    tl.store(mine + slot * slot_elems + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    tl.debug_barrier()  # the whole chunk is written before the signal
    # flags are touched by one lane only (a scalar atomic would run in every thread)
    lane = tl.arange(0, 32)
    first = lane == 0
    for r in tl.static_range(WORLD):
        flags = tl.load(table_ptr + WORLD + r).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flags + pid * WORLD + RANK + lane * 0, target + lane * 0, mask=first,
                       sem="release", scope="sys")  # fmt: skip
    my_flags = tl.load(table_ptr + RANK + WORLD).to(tl.pointer_type(tl.int64))
    abort = tl.load(table_ptr + 2 * WORLD).to(tl.pointer_type(tl.int64))
    for r in tl.static_range(WORLD):
        ptr = my_flags + pid * WORLD + r + lane * 0
        seen = tl.max(tl.atomic_add(ptr, lane * 0, mask=first, sem="acquire", scope="sys"), 0)
        while seen < target:
            if tl.load(abort, volatile=True) != 0:
                seen = target  # a rank is gone: return (rank 0 raises after the step)
            else:
                seen = tl.max(
                    tl.atomic_add(ptr, lane * 0, mask=first, sem="acquire", scope="sys"), 0
                )
    tl.debug_barrier()
    acc = tl.zeros([BLOCK], tl.float32)
    for r in tl.static_range(WORLD):
        peer = tl.load(table_ptr + r).to(tl.pointer_type(elem))
        # .cg: through L2, never a stale L1 line of this slot's last use
        part = tl.load(peer + slot * slot_elems + offs, mask=mask, cache_modifier=".cg")
        acc += part.to(tl.float32)
    tl.store(x_ptr + offs, acc.to(elem), mask=mask)


class PeerAllReduce:
    """This rank's side of the one-shot all-reduce among the ranks of one node."""

    def __init__(self, rank: int, world: int, device: torch.device, store, max_bytes=MAX_BYTES):
        import cupy

        self.rank, self.world, self.max_bytes = rank, world, max_bytes
        self.device = device
        runtime = cupy.cuda.runtime
        max_blocks = -(-max_bytes // (2 * BLOCK))  # programs of the largest call (2-byte dtypes)
        flag_bytes = max_blocks * world * 8
        self._opened: list[int] = []
        try:
            with cupy.cuda.Device(device.index):
                self._data = runtime.malloc(2 * max_bytes)
                self._flags = runtime.malloc(flag_bytes)
                runtime.memset(self._flags, 0, flag_bytes)
                runtime.deviceSynchronize()
                mine = (
                    runtime.ipcGetMemHandle(self._data),
                    runtime.ipcGetMemHandle(self._flags),
                    runtime.deviceGetPCIBusId(device.index),
                )
        except BaseException:
            store.set(f"pdray-ar/{rank}", pickle.dumps(None))  # the peers must not wait for it
            raise
        store.set(f"pdray-ar/{rank}", pickle.dumps(mine))
        data, flags = [0] * world, [0] * world
        data[rank], flags[rank] = self._data, self._flags
        with cupy.cuda.Device(device.index):
            for r in range(world):
                if r == rank:
                    continue
                theirs = pickle.loads(store.get(f"pdray-ar/{r}"))
                if theirs is None:
                    raise RuntimeError(f"rank {r} could not export its all-reduce buffers")
                data_handle, flag_handle, bus_id = theirs
                peer = runtime.deviceGetByPCIBusId(bus_id)
                if peer != device.index and not runtime.deviceCanAccessPeer(device.index, peer):
                    raise RuntimeError(f"GPU {device.index} cannot access GPU {peer} as a peer")
                for handle, out in ((data_handle, data), (flag_handle, flags)):
                    ptr = runtime.ipcOpenMemHandle(handle)
                    self._opened.append(ptr)
                    out[r] = ptr
        self.abort_word = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        table = data + flags + [self.abort_word.data_ptr()]
        self.table = torch.tensor(table, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        self.slot_bytes = max_bytes

    def fits(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dtype in _DTYPES
            and x.is_contiguous()
            and x.numel() * x.element_size() <= self.max_bytes
        )

    def __call__(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n * x.element_size() > self.max_bytes:
            raise ValueError(f"{n * x.element_size()} bytes exceed the peer all-reduce's limit")
        grid = (triton.cdiv(n, BLOCK),)
        _one_shot_all_reduce[grid](
            x, n, self.table, self.epoch, self.slot_bytes // x.element_size(),
            RANK=self.rank, WORLD=self.world, BLOCK=BLOCK, num_warps=4,
        )  # fmt: skip
        self.epoch.add_(1)

    def abort(self) -> None:
        """Make kernels waiting for a lost peer return (their sums are then wrong: the caller
        must not use them)."""
        self.abort_word.fill_(1)

    def close(self) -> None:
        import cupy

        with contextlib.suppress(Exception), cupy.cuda.Device(self.device.index):
            for ptr in self._opened:
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            self._opened = []


def setup_peer_all_reduce(rank: int, world: int, device: torch.device, store):
    """A PeerAllReduce when every rank could build one, else None on every rank (each rank says
    whether it succeeded through the store and reads the others')."""
    fast, error = None, None
    try:
        fast = PeerAllReduce(rank, world, device, store)
    except Exception as e:  # no CuPy, no peer access, IPC refused (another node)...
        error = f"{type(e).__name__}: {e}"
    store.set(f"pdray-ar-ok/{rank}", b"1" if fast is not None else b"0")
    everyone = all(store.get(f"pdray-ar-ok/{r}") == b"1" for r in range(world))
    if not everyone and fast is not None:
        fast.close()
        fast = None
    return fast, error
