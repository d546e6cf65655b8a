"""A read-only streaming kernel: measures how fast this GPU reads HBM (the decode bound's rate).

Each program sums a contiguous chunk with wide loads and writes one float, so the bytes moved
are the input's bytes. Reference: `x.float().sum()` equals the sum of the partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(x_ptr, partial_ptr, chunk, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, chunk, BLOCK):
        acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(acc, 0))


def read_all(x: torch.Tensor, num_programs: int, block: int = 4096) -> torch.Tensor:
    """Partial sums [num_programs] of a contiguous tensor whose numel divides into chunks."""
    chunk = x.numel() // num_programs
    if chunk % block or chunk * num_programs != x.numel():
        raise ValueError("x.numel() must be num_programs * a multiple of block")
    partial = torch.empty(num_programs, dtype=torch.float32, device=x.device)
    _read_kernel[(num_programs,)](x, partial, chunk, BLOCK=block, num_warps=8)
    return partial


def measure_read_bandwidth_gbps(num_bytes: int = 4 << 30, iters: int = 20) -> float:
    """HBM read bandwidth of the current GPU in GB/s: median over `iters` full reads (bf16)."""
    import triton.testing

    num_programs = torch.cuda.get_device_properties(0).multi_processor_count * 16
    block = 4096
    chunk = max(1, num_bytes // 2 // (num_programs * block)) * block
    x = torch.randn(num_programs * chunk, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(
        lambda x=x: read_all(x, num_programs, block), warmup=50, rep=iters * 5, return_mode="median"
    )
    gbps = x.numel() * x.element_size() / (ms * 1e-3) / 1e9
    del x
    return gbps
