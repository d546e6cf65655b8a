"""Copy rates that the KV transfer benchmark (`pdray.bench.transfer`) sets its transfers against,
measured in the same run on the receiver's GPU: plain copies of a transfer's size (D2D, out of the
IPC mapping, from the sender's GPU), the transfer's own copy alone, and the ratios to them.
Every byte copied counts once (not read + write).
"""

from __future__ import annotations

import contextlib

import torch

from pdray.bench.timing import device_median_ms


def enable_peer_access(a: torch.device, b: torch.device) -> bool:
    """Enables peer access between two GPUs both ways (the transport enables receiver -> sender,
    torch's cross-device `copy_` sender -> receiver); False if either cannot reach the other
    (a copy between them is then staged by the driver)."""
    import cupy

    runtime = cupy.cuda.runtime
    possible = True
    for device, peer in ((a.index, b.index), (b.index, a.index)):
        if not runtime.deviceCanAccessPeer(device, peer):
            possible = False
            continue
        with cupy.cuda.Device(device), contextlib.suppress(runtime.CUDARuntimeError):
            runtime.deviceEnablePeerAccess(peer)  # raises if already enabled
    return possible


def same_size_ceilings(cache, mapped, plain_buffers, num_bytes: int, peer_src=None) -> dict:
    """GB/s of plain copies of the transfer's size: D2D, out of the IPC mapping, and, with
    `peer_src` (a buffer on the sender's GPU), from the sender's GPU into the receiver's."""
    src, dst = (b[:num_bytes] for b in plain_buffers)
    local = cache.view(-1).view(torch.uint8)[:num_bytes]
    remote = mapped.view(-1).view(torch.uint8)[:num_bytes]
    ceilings = {
        "d2d_same_size_gbps": _gbps(num_bytes, lambda: dst.copy_(src)),
        "ipc_same_size_gbps": _gbps(num_bytes, lambda: local.copy_(remote)),
    }
    if peer_src is not None:
        peer = peer_src[:num_bytes]
        ceilings["peer_same_size_gbps"] = _gbps(num_bytes, lambda: dst.copy_(peer))
    return ceilings


def copy_alone(cache, mapped, src: list[int], dst: list[int], num_bytes: int) -> dict:
    """GB/s of the transfer's own copy without the transport: one `kernels.kv_copy` launch of
    all layers' K and V of the blocks out of the IPC mapping (the receiver's copy); for
    contiguous blocks also torch's strided copy of the same views."""
    from pdray.kernels.kv_copy import copy_kv_blocks

    src_ids = torch.tensor(src, device=cache.device)
    dst_ids = torch.tensor(dst, device=cache.device)

    def kernel() -> None:
        copy_kv_blocks(cache, dst_ids, mapped, src_ids)

    alone = {"ipc_kv_copy_kernel_gbps": _gbps(num_bytes, kernel)}
    if dst == list(range(dst[0], dst[0] + len(dst))) and src == list(range(len(src))):
        dst_view = cache[:, :, dst[0] : dst[0] + len(dst)]
        src_view = mapped[:, :, : len(src)]
        alone["ipc_torch_strided_copy_gbps"] = _gbps(num_bytes, lambda: dst_view.copy_(src_view))
    return alone


def _gbps(num_bytes: int, copy) -> float:
    return num_bytes / device_median_ms(copy, 10, warmup=1) / 1e6


def on_receiver(mapped: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Blocks 0..n-1 of the mapped sender cache, copied to `device` as the receiver copies them:
    by `kernels.kv_copy` on the current GPU (the receiver's, whose context mapped the sender's
    cache; torch would run its own kernels on the GPU the mapping's pointer names)."""
    from pdray.kernels.kv_copy import copy_kv_blocks

    out = torch.empty((*mapped.shape[:2], n, *mapped.shape[3:]), dtype=mapped.dtype, device=device)
    ids = torch.arange(n, device=device)
    copy_kv_blocks(out, ids, mapped, ids)
    return out


def ratios(case: dict, d2d_large_gbps: float, peer_large_gbps: float | None) -> dict:
    """The case's transfer ("ratio") and in-place rates over the same run's plain copies."""
    bases = {"d2d_same_size": case["d2d_same_size_gbps"], "d2d_large": d2d_large_gbps,
             "ipc_same_size": case["ipc_same_size_gbps"]}  # fmt: skip
    if peer_large_gbps is not None:
        bases |= {"peer_same_size": case["peer_same_size_gbps"], "peer_large": peer_large_gbps}
    out = {}
    for name, gbps in bases.items():
        out[f"ratio_vs_{name}"] = case["transfer_gbps"] / gbps
        out[f"in_place_vs_{name}"] = case["in_place_gbps"] / gbps
    return out
