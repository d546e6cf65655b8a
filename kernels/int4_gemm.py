"""Weight-only int4 linear layers: out [M, N] = x [M, K] @ W.T (+ bias), W stored as `Int4Weight`.

Layout (pdray/quantization/int4.py): qweight uint8 [N, K // 2] (column 2j in the low nibble of byte
j, 2j + 1 in the high nibble), scales and zeros [N, K // g] in x's dtype, W = (code - zero) * scale,
g in {32, 64, 128}. x [M, K] bf16/fp16, bias [N], out [M, N] in x's dtype; fp32 accumulation.
Three paths, chosen from M alone (`Int4Path`):
- `GEMV` (decode, M <= FMA_MAX_M): one program per (BLOCK_N rows, one row of x); a thread reads
  chunks of 1-4 int32 words (eight codes each) of one group. With v = 1 + code / 128, built by one
  byte permute per code (the code under 1.0's exponent bits), sum (code - zero) x =
  128 sum v x - (128 + zero) sum x: a code costs a permute and a multiply-add, a chunk's sums
  are scaled once; x is read with 16-byte loads, and each step's loads are issued a step ahead.
  Up to 4096 columns a program instead holds x's whole row in registers (each thread its own
  chunks, converted and summed once) and walks tiles of rows (`programs_per_sm`).
- `GEMM` (M up to PREFILL_MIN_M): a [BLOCK_N, group columns] tile is dequantized in registers to
  x's dtype, rounded as `dequantize` rounds, and fed to the tensor cores (`tl.dot`) against
  x's even and odd columns; `inline_asm` does that dequantization two codes per instruction
  (bf16x2/f16x2 arithmetic, sm_80+). Split over K (`split_k`) where the output tiles alone
  would leave multiprocessors idle: each split stores fp32 partial sums and the last of a tile
  to arrive adds them up in split order (a per-stream arrival counter it re-arms).
- `DEQUANT_MATMUL` (prefill): the weight is dequantized into a scratch [N, K] tensor in x's dtype
  and multiplied by cuBLAS, which keeps the tensor cores busier than a fused Triton GEMM.
GEMV and GEMM allocate only the output (and split-K's partial sums) and never sync with the host,
so they can be captured in a CUDA graph. Reference: `pdray.quantization.int4.int4_linear_reference`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdray.quantization.int4 import Int4Weight
from pdray.quantization.int4 import dequantize as reference_dequantize

FMA_MAX_M = 1  # GEMV up to here, GEMM above
PREFILL_MIN_M = 256  # DEQUANT_MATMUL from here
_SCRATCH_ELEMENTS = 1 << 27  # DEQUANT_MATMUL's weight scratch: 256 MB of bf16 at most
_DTYPES = (torch.bfloat16, torch.float16)
_MAGIC = tl.constexpr(0x4B000000)  # float32 bits of 2^23


class Int4Path(enum.Enum):
    GEMV = "gemv"
    GEMM = "gemm"
    DEQUANT_MATMUL = "dequant_matmul"


@dataclass(frozen=True, slots=True)
class Int4Config:
    block_m: int  # GEMV: 1 (one row of x per program)
    block_n: int
    block_groups: int  # quantization groups along K per iteration
    num_warps: int
    num_stages: int
    inline_asm: bool = True  # decode codes with PTX (byte permutes; bf16x2/f16x2) on CUDA
    words_per_chunk: int = 4  # GEMV: a thread's unit of 8-code words (1, 2 or 4)
    # GEMV: 0 = a program per BLOCK_N rows, K in steps of block_groups; n > 0 = n programs a
    # multiprocessor, each holding all of x's row in registers and walking tiles of BLOCK_N rows
    programs_per_sm: int = 0
    # GEMM: programs per output tile, each over its share of K's groups; the last of a tile to
    # finish sums their fp32 partials (no second kernel). 0: as many as it takes to reach
    # programs_per_sm programs a multiprocessor (at least 1 a tile)
    split_k: int = 1


# Picked on one H200 by `python -m pdray.bench.linear --tune` (docs/performance.md, "Linear kernels
# (issue 17)"); block_groups counts groups of 128 columns (scaled for smaller groups). GEMV: the
# best per layer of the sweep, 4 rows a program: 512 columns a step with 2 warps for gate_up
# (28672 x 4096, 31.9 us), 1024 with 4 warps for layers under 16384 output features (qkv 10.1,
# o 7.3, down 18.7 us).
_GEMV_CONFIG = Int4Config(1, 4, 4, num_warps=2, num_stages=1)
_GEMV_CONFIG_NARROW = Int4Config(1, 4, 8, num_warps=4, num_stages=1)
_GEMV_NARROW_N = 16384
# Up to 4096 columns (one 32-code chunk a thread, at most 4 warps) the x-stationary GEMV is faster:
# 2 rows a tile, 4 programs a multiprocessor (docs/performance.md, "The int4 GEMV with x held in
# registers": qkv 10.1 -> 7.6 us, o 7.3 -> 5.9, gate_up 31.9 -> 27.1; down, 14336 columns, 18.7
# against 19.1 at best, keeps the kernel above)
_X_STATIONARY_MAX_K = 4096
_X_STATIONARY = Int4Config(1, 2, 1, num_warps=4, num_stages=1, programs_per_sm=4)
# GEMM at M <= 64: split over K until there are 4 (M <= 16) or 2 programs a multiprocessor, one
# group a step (docs/performance.md, "Split-K for the int4 GEMM": the four layers at M = 16
# 111 -> 86 us, at M = 64 162 -> 148 us, in one sweep)
_GEMM_CONFIGS: dict[int, Int4Config] = {
    16: Int4Config(16, 64, 1, num_warps=4, num_stages=3, programs_per_sm=4, split_k=0),
    64: Int4Config(64, 32, 1, num_warps=4, num_stages=3, programs_per_sm=2, split_k=0),
    PREFILL_MIN_M: Int4Config(64, 64, 2, num_warps=4, num_stages=3),
}


def choose_path(m: int) -> Int4Path:
    if m <= FMA_MAX_M:
        return Int4Path.GEMV
    return Int4Path.GEMM if m < PREFILL_MIN_M else Int4Path.DEQUANT_MATMUL


def default_config(
    path: Int4Path, m: int, group_size: int, n: int | None = None, k: int | None = None
) -> Int4Config:
    """Tuned block sizes for a path, M (and N and K, for the GEMV); block_groups scaled so a step
    covers 128+ columns."""
    if path is Int4Path.GEMV and k is not None and k <= _X_STATIONARY_MAX_K:
        warps = min(4, max(1, triton.next_power_of_2(k // 32) // 32))
        return dataclasses.replace(_X_STATIONARY, num_warps=warps)
    if path is Int4Path.GEMV:
        cfg = _GEMV_CONFIG_NARROW if n is not None and n < _GEMV_NARROW_N else _GEMV_CONFIG
    else:
        cfg = next((_GEMM_CONFIGS[lim] for lim in sorted(_GEMM_CONFIGS) if m <= lim), None)
        cfg = cfg or _GEMM_CONFIGS[max(_GEMM_CONFIGS)]
    groups = max(1, cfg.block_groups * 128 // group_size)
    return dataclasses.replace(cfg, block_groups=groups)


# -- GEMV: one row of x, codes decoded as floats -----------------------------------------------


_UNPACK8_ASM = tl.constexpr(
    "{\n.reg .b32 lo, hi, m;\nmov.b32 m, 0x3F000000;\n"
    "lop3.b32 lo, $8, 0x0F0F0F0F, 0x80808080, 0xEA;\nshr.u32 hi, $8, 4;\n"
    "lop3.b32 hi, hi, 0x0F0F0F0F, 0x80808080, 0xEA;\n"
    + "".join(
        f"prmt.b32 ${2 * b}, lo, m, 0x7{b}44;\nprmt.b32 ${2 * b + 1}, hi, m, 0x7{b}44;\n"
        for b in range(4)
    )  # fmt: skip
    + "}"
)


@triton.jit
def _unpack8_asm(words):
    """int32 words -> 8 float32 tensors v_i = 1 + code_i / 128, code_i = nibble i (column 8w + i):
    (byte & 0x0F) | 0x80 per byte (one lop3 for the low nibbles, a shift and one for the high),
    then one byte permute per code puts that byte under 0x3F, 1.0's top byte: the 0x80 bit is the
    low bit of 1.0's exponent and the code the top of its mantissa (PTX lop3/prmt; CUDA only)."""
    return tl.inline_asm_elementwise(
        _UNPACK8_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
        dtype=(tl.float32,) * 8, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _code(words, i: tl.constexpr):
    """1 + (nibble i of int32 `words`) / 128 without PTX (the interpreter, `inline_asm=False`)."""
    return ((words >> (4 * i)) & 0xF).to(tl.float32) * (1.0 / 128) + 1.0


@triton.jit
def _load16_asm(ptr):
    """Four int32 at a 16-byte aligned `ptr`, one 16-byte load (PTX; CUDA only). Triton would load
    x's pairs as four 4-byte loads 64 bytes apart across a warp: four times the L1 wavefronts."""
    return tl.inline_asm_elementwise(
        "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptr],
        dtype=(tl.int32,) * 4, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _pair_floats(p, X_BF16: tl.constexpr):
    """int32 pair of x values (columns 2j, 2j + 1) -> two float32."""
    if X_BF16:  # a bf16 is the top half of its float32
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)
    lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _x_word(x_pairs_ptr, pair, mask, INLINE_ASM: tl.constexpr):
    """x pairs pair..pair + 3 (one word's 8 columns) as four int32 tensors."""
    if INLINE_ASM:
        return _load16_asm(x_pairs_ptr + pair)
    p0 = tl.load(x_pairs_ptr + pair, mask=mask, other=0)
    p1 = tl.load(x_pairs_ptr + pair + 1, mask=mask, other=0)
    p2 = tl.load(x_pairs_ptr + pair + 2, mask=mask, other=0)
    p3 = tl.load(x_pairs_ptr + pair + 3, mask=mask, other=0)
    return p0, p1, p2, p3


@triton.jit
def _word(words, xw, X_BF16: tl.constexpr, INLINE_ASM: tl.constexpr):
    """(sum_i v_i x_i per element of int32 `words` [R, C], sum_i x_i [C]) over a word's 8 codes,
    v_i = 1 + code_i / 128; `xw` = the word's x pairs (`_x_word`): byte b's low / high nibble is
    pair b's low / high half."""
    x0l, x0h = _pair_floats(xw[0], X_BF16)
    x1l, x1h = _pair_floats(xw[1], X_BF16)
    x2l, x2h = _pair_floats(xw[2], X_BF16)
    x3l, x3h = _pair_floats(xw[3], X_BF16)
    if INLINE_ASM:
        v0, v1, v2, v3, v4, v5, v6, v7 = _unpack8_asm(words)
    else:
        v0, v1, v2, v3 = _code(words, 0), _code(words, 1), _code(words, 2), _code(words, 3)
        v4, v5, v6, v7 = _code(words, 4), _code(words, 5), _code(words, 6), _code(words, 7)
    vx = v0 * x0l[None, :]
    vx += v1 * x0h[None, :]
    vx += v2 * x1l[None, :]
    vx += v3 * x1h[None, :]
    vx += v4 * x2l[None, :]
    vx += v5 * x2h[None, :]
    vx += v6 * x3l[None, :]
    vx += v7 * x3h[None, :]
    xs = ((x0l + x0h) + (x1l + x1h)) + ((x2l + x2h) + (x3l + x3h))
    return vx, xs


@triton.jit
def _x_loads(x_row, chunk, num_chunks, cmask, WPC: tl.constexpr, INLINE_ASM: tl.constexpr):
    """x pairs of `chunk` (WPC words x 4 int32 [C]; the unused words repeat the first; read
    from the last chunk past it)."""
    pair = tl.minimum(chunk, num_chunks - 1) * (4 * WPC)  # x pairs of the chunk's first word
    x0 = _x_word(x_row, pair, cmask, INLINE_ASM)
    x1, x2, x3 = x0, x0, x0
    if WPC >= 2:
        x1 = _x_word(x_row, pair + 4, cmask, INLINE_ASM)
    if WPC == 4:
        x2 = _x_word(x_row, pair + 8, cmask, INLINE_ASM)
        x3 = _x_word(x_row, pair + 12, cmask, INLINE_ASM)
    return x0, x1, x2, x3


@triton.jit
def _gemv_loads(q_rows, x_row, s_rows, z_rows, chunk, num_chunks,
                CPG: tl.constexpr, WPC: tl.constexpr, INLINE_ASM: tl.constexpr):  # fmt: skip
    """A step's operands: weight words [R, C, WPC] (0 past the last chunk), scales and zeros
    [R, C] (float32; 0 past the last group), and `_x_loads` (x past the last chunk is cancelled
    by the zero scale)."""
    cmask = chunk < num_chunks
    kw = tl.arange(0, WPC)[None, None, :]
    qw = tl.load(q_rows + (chunk * WPC)[None, :, None] + kw, mask=cmask[None, :, None], other=0)
    grp = chunk // CPG
    s = tl.load(s_rows + grp[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
    z = tl.load(z_rows + grp[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
    x0, x1, x2, x3 = _x_loads(x_row, chunk, num_chunks, cmask, WPC, INLINE_ASM)
    return qw, s, z, x0, x1, x2, x3


@triton.jit
def _gemv_step(acc, ops, X_BF16: tl.constexpr, INLINE_ASM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WPC: tl.constexpr):  # fmt: skip
    """acc [R, C] + one step's products (`ops` from `_gemv_loads`)."""
    qw, s, z, x0, x1, x2, x3 = ops
    if WPC == 1:
        vx, xs = _word(tl.reshape(qw, [BLOCK_N, BLOCK_C]), x0, X_BF16, INLINE_ASM)
    elif WPC == 2:
        q0, q1 = tl.split(qw)
        vx, xs = _word(q0, x0, X_BF16, INLINE_ASM)
        vx1, xs1 = _word(q1, x1, X_BF16, INLINE_ASM)
        vx += vx1
        xs += xs1
    else:
        q_even, q_odd = tl.split(tl.reshape(qw, [BLOCK_N, BLOCK_C, 2, 2]))  # split: last dim
        q0, q2 = tl.split(q_even)
        q1, q3 = tl.split(q_odd)
        vx, xs = _word(q0, x0, X_BF16, INLINE_ASM)
        vx1, xs1 = _word(q1, x1, X_BF16, INLINE_ASM)
        vx2, xs2 = _word(q2, x2, X_BF16, INLINE_ASM)
        vx3, xs3 = _word(q3, x3, X_BF16, INLINE_ASM)
        vx = (vx + vx1) + (vx2 + vx3)
        xs = (xs + xs1) + (xs2 + xs3)
    return acc + s * (128.0 * vx - (128.0 + z) * xs[None, :])


@triton.jit
def _int4_gemv_kernel(
    x_ptr,  # int32 view of x [M, K]: x at columns 2j, 2j + 1 in pair j (little-endian halves)
    q_ptr,  # int32 words [N, K // 8]: word w holds columns 8w..8w+7, column 8w+i in nibble i
    s_ptr,  # [N, K // GROUP]
    z_ptr,  # [N, K // GROUP]
    b_ptr,  # [N]
    out_ptr,  # [M, N]
    N,
    num_groups,
    stride_xm,  # in pairs
    stride_qn,
    stride_sn,
    stride_om,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INLINE_ASM: tl.constexpr,
    X_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    WPC: tl.constexpr,  # words per chunk: 1, 2 or 4
):
    """A program: BLOCK_N rows of W and one row of x, BLOCK_G groups of columns a step. A thread's
    unit is a chunk of WPC words (8 WPC codes of one group, one 4-16 byte load); the x of a chunk
    is WPC 16-byte loads 16 WPC bytes apart across a warp, so the fewer words a chunk, the fewer
    L1 wavefronts x costs (x's loads cost a third of the time at WPC 4), and the more scaling. With v_i = 1 + code_i /
    128 (exact in float32), sum_i (code_i - zero) x_i = 128 sum_i v_i x_i - (128 + zero)
    sum_i x_i: a code costs one byte permute and one multiply-add, a chunk's two sums are scaled
    once, and sum_i x_i is shared by all rows. A step's loads are issued before the step before
    it computes: two sets of operands in turn (the loop does two steps), so a load never waits
    for the registers it overwrites (with one set rotated, the compiler put each load after the
    math that freed its registers, and nothing overlapped; Triton itself pipelines only loads
    that feed tl.dot). x is loaded per chunk (1-D, fewer elements than threads), so Triton
    loads it straight into the layout the math uses, with no trip through shared memory."""
    CPG: tl.constexpr = GROUP // (8 * WPC)  # chunks per group
    BLOCK_C: tl.constexpr = BLOCK_G * CPG  # chunks per step
    num_rows = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    row = (tl.program_id(0) % num_rows).to(tl.int64)
    rn = (tl.program_id(0) // num_rows) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rn, N - 1).to(tl.int64)  # rows past N re-read row N - 1, never stored
    ci = tl.arange(0, BLOCK_C)
    x_row = x_ptr + row * stride_xm
    q_rows = q_ptr + rows[:, None, None] * stride_qn
    s_rows = s_ptr + rows[:, None] * stride_sn
    z_rows = z_ptr + rows[:, None] * stride_sn
    num_chunks = num_groups * CPG
    ops_a = _gemv_loads(q_rows, x_row, s_rows, z_rows, ci, num_chunks, CPG, WPC, INLINE_ASM)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for c0 in range(0, num_chunks, 2 * BLOCK_C):
        chunk = c0 + ci  # [BLOCK_C]
        ops_b = _gemv_loads(q_rows, x_row, s_rows, z_rows, chunk + BLOCK_C, num_chunks, CPG,
                            WPC, INLINE_ASM)  # fmt: skip
        acc = _gemv_step(acc, ops_a, X_BF16, INLINE_ASM, BLOCK_N, BLOCK_C, WPC)
        ops_a = _gemv_loads(q_rows, x_row, s_rows, z_rows, chunk + 2 * BLOCK_C, num_chunks, CPG,
                            WPC, INLINE_ASM)  # fmt: skip
        acc = _gemv_step(acc, ops_b, X_BF16, INLINE_ASM, BLOCK_N, BLOCK_C, WPC)
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(out_ptr + row * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemv_tile_loads(q_ptr, s_ptr, z_ptr, tile, num_tiles, N, stride_qn, stride_sn, ci,
                     num_chunks, BLOCK_N: tl.constexpr, CPG: tl.constexpr,
                     WPC: tl.constexpr):  # fmt: skip
    """Row tile `tile`'s weight words [R, C, WPC] and float32 scales and zeros [R, C] for chunks
    `ci`; 0 past the last chunk or tile (rows past N re-read row N - 1, never stored)."""
    rows = tl.minimum(tile * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    cmask = ci < tl.where(tile < num_tiles, num_chunks, 0)
    kw = tl.arange(0, WPC)[None, None, :]
    q_offs = rows[:, None, None] * stride_qn + (ci * WPC)[None, :, None] + kw
    qw = tl.load(q_ptr + q_offs, mask=cmask[None, :, None], other=0)
    sz_offs = rows[:, None] * stride_sn + (ci // CPG)[None, :]
    s = tl.load(s_ptr + sz_offs, mask=cmask[None, :], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz_offs, mask=cmask[None, :], other=0.0).to(tl.float32)
    return qw, s, z


@triton.jit
def _gemv_tile_store(acc, tile, b_ptr, out_ptr, N, BLOCK_N: tl.constexpr,
                     HAS_BIAS: tl.constexpr):  # fmt: skip
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _int4_gemv_x_stationary_kernel(
    x_ptr,  # int32 pairs of x [1, K], as _int4_gemv_kernel
    q_ptr,  # int32 words [N, K // 8]
    s_ptr,  # [N, K // GROUP]
    z_ptr,  # [N, K // GROUP]
    b_ptr,  # [N]
    out_ptr,  # [1, N]
    N,
    num_groups,
    stride_qn,
    stride_sn,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INLINE_ASM: tl.constexpr,
    X_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,  # chunks of a row: the next power of two of K // (8 WPC)
    WPC: tl.constexpr,
):
    """One row of x held in registers for the whole program: thread t owns chunks t, t + T, ...
    of every row, loads their x once, and the program walks row tiles pid, pid + P, ... (P
    programs). The per-x work of _int4_gemv_kernel (x's floats and their chunk sums, a third of
    its instructions where each thread takes one row) is loop-invariant here and done once; a
    tile costs a permute and a multiply-add a code plus one reduction of BLOCK_N sums across
    the program. Two tiles' loads are in flight in turn, as in _int4_gemv_kernel."""
    CPG: tl.constexpr = GROUP // (8 * WPC)
    num_tiles = tl.cdiv(N, BLOCK_N)
    step = tl.num_programs(0)
    ci = tl.arange(0, BLOCK_C)
    num_chunks = num_groups * CPG
    x0, x1, x2, x3 = _x_loads(x_ptr, ci, num_chunks, ci < num_chunks, WPC, INLINE_ASM)
    zero = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    tile = tl.program_id(0)
    qa, sa, za = _gemv_tile_loads(q_ptr, s_ptr, z_ptr, tile, num_tiles, N, stride_qn, stride_sn,
                                  ci, num_chunks, BLOCK_N, CPG, WPC)  # fmt: skip
    for t in range(tile, num_tiles, 2 * step):
        qb, sb, zb = _gemv_tile_loads(q_ptr, s_ptr, z_ptr, t + step, num_tiles, N, stride_qn,
                                      stride_sn, ci, num_chunks, BLOCK_N, CPG, WPC)  # fmt: skip
        acc = _gemv_step(zero, (qa, sa, za, x0, x1, x2, x3), X_BF16, INLINE_ASM, BLOCK_N,
                         BLOCK_C, WPC)  # fmt: skip
        _gemv_tile_store(acc, t, b_ptr, out_ptr, N, BLOCK_N, HAS_BIAS)
        qa, sa, za = _gemv_tile_loads(q_ptr, s_ptr, z_ptr, t + 2 * step, num_tiles, N,
                                      stride_qn, stride_sn, ci, num_chunks, BLOCK_N, CPG,
                                      WPC)  # fmt: skip
        acc = _gemv_step(zero, (qb, sb, zb, x0, x1, x2, x3), X_BF16, INLINE_ASM, BLOCK_N,
                         BLOCK_C, WPC)  # fmt: skip
        _gemv_tile_store(acc, t + step, b_ptr, out_ptr, N, BLOCK_N, HAS_BIAS)


# -- GEMM: tiles dequantized to x's dtype, tensor cores ----------------------------------------


def _dequant_asm_source(magic: str, one: str, op: str) -> str:
    """PTX for `_dequant_asm`: $4 = four code bytes, $5/$6 = -(magic + zero) and $7/$8 = scale
    as two packed pairs each; $0/$1 = the four low nibbles, $2/$3 = the four high nibbles."""
    lines = [
        "{",
        ".reg .b32 a, b, h, one, nz, zero;",
        f"mov.b32 one, {one};",
        "mov.b32 nz, 0x80008000;",
        "mov.b32 zero, 0;",
        "prmt.b32 a, $4, zero, 0x4140;",  # bytes 0 and 1 in the low byte of each half
        "prmt.b32 b, $4, zero, 0x4342;",  # bytes 2 and 3
    ]
    for shift, out_regs in ((False, ("$0", "$1")), (True, ("$2", "$3"))):
        if shift:
            lines += ["shr.b32 a, a, 4;", "shr.b32 b, b, 4;"]
        for src, neg_zero, scale, out in (("a", "$5", "$7", out_regs[0]),
                                          ("b", "$6", "$8", out_regs[1])):  # fmt: skip
            lines += [
                f"lop3.b32 h, {src}, 0x000F000F, {magic}, 0xEA;",  # (src & 0xF) | magic
                f"{op} h, h, one, {neg_zero};",  # magic + code - (magic + zero): exact
                f"{op} {out}, h, {scale}, nz;",  # * scale, rounded once
            ]
    return "\n".join([*lines, "}"])


# (PTX, the float its magic number stands for) per activation dtype
_ASM = {
    torch.bfloat16: (_dequant_asm_source("0x43004300", "0x3F803F80", "fma.rn.bf16x2"), 128.0),
    torch.float16: (_dequant_asm_source("0x64006400", "0x3C003C00", "fma.rn.f16x2"), 1024.0),
}


@triton.jit
def _dequant_asm(qb, neg_zero, scale, ASM: tl.constexpr):
    """Low and high nibbles of uint8 codes -> (code - zero) * scale in scale's dtype, two codes per
    bf16x2/f16x2 instruction (`ASM`: _ASM_BF16 or _ASM_F16): the code OR-ed into the mantissa of
    128 (bf16) or 1024 (f16), minus that + zero (exact), times scale (rounded once, as
    `dequantize` rounds). neg_zero = -(128 or 1024 + zero) and scale in scale's dtype, all three
    of one shape."""
    return tl.inline_asm_elementwise(
        ASM, "=r,=r,=r,=r,r,r,r,r,r", [qb, neg_zero, scale],
        dtype=(scale.dtype, scale.dtype), is_pure=True, pack=4,
    )  # fmt: skip


@triton.jit
def _int4_gemm_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # uint8 [N, K // 2]
    s_ptr,  # [N, K // GROUP]
    z_ptr,  # [N, K // GROUP]
    b_ptr,  # [N]
    out_ptr,  # [M, N]
    part_ptr,  # fp32 [SPLIT_K, M, N] (SPLIT_K > 1)
    count_ptr,  # int32 [tiles], zero between launches (SPLIT_K > 1)
    M,
    N,
    num_groups,
    groups_per_split,  # a multiple of BLOCK_G
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_G: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INLINE_ASM: tl.constexpr,
    ASM: tl.constexpr,  # the PTX of _dequant_asm for x's dtype
    ASM_MAGIC: tl.constexpr,  # 128.0 (bf16) or 1024.0 (fp16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    GB: tl.constexpr = GROUP // 2  # bytes per group
    BLOCK_KB: tl.constexpr = BLOCK_G * GB  # bytes (column pairs) per step
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)  # M tiles of one N tile run together: its weight tile is read once
    split = tl.program_id(1)
    rm = (tile % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile // num_m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rn, N - 1).to(tl.int64)  # rows past N or M re-read the last; never stored
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm
    g_end = tl.minimum(num_groups, (split + 1) * groups_per_split)
    gi = tl.arange(0, BLOCK_G)
    bi = tl.arange(0, GB)
    q_rows = q_ptr + rows[:, None, None] * stride_qn
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g0 in range(split * groups_per_split, g_end, BLOCK_G):
        g = g0 + gi
        byte = g[:, None] * GB + bi[None, :]  # [BLOCK_G, GB]
        sz_offs = rows[:, None] * stride_sn + g[None, :]
        cols = g0 * GROUP + tl.arange(0, 2 * BLOCK_KB)  # columns of the step
        if EVEN_G:
            qb = tl.load(q_rows + byte[None, :, :])
            s = tl.load(s_ptr + sz_offs)
            z = tl.load(z_ptr + sz_offs)
            x = tl.load(x_rows + cols[None, :])
        else:
            gmask = g < g_end
            qb = tl.load(q_rows + byte[None, :, :], mask=gmask[None, :, None], other=0)
            s = tl.load(s_ptr + sz_offs, mask=gmask[None, :], other=0.0)
            z = tl.load(z_ptr + sz_offs, mask=gmask[None, :], other=0.0)
            x = tl.load(x_rows + cols[None, :], mask=cols[None, :] < g_end * GROUP, other=0.0)
        if INLINE_ASM:
            neg_zero = (-(z.to(tl.float32) + ASM_MAGIC)).to(dtype)
            shape: tl.constexpr = [BLOCK_N, BLOCK_G, GB]
            low, high = _dequant_asm(
                qb, tl.broadcast_to(neg_zero[:, :, None], shape),
                tl.broadcast_to(s[:, :, None], shape), ASM,
            )  # fmt: skip
        else:
            zf = z.to(tl.float32)[:, :, None] + 8388608.0
            sf = s.to(tl.float32)[:, :, None]
            qi = qb.to(tl.int32)
            low = ((((qi & 0xF) | _MAGIC).to(tl.float32, bitcast=True) - zf) * sf).to(dtype)
            high = ((((qi >> 4) | _MAGIC).to(tl.float32, bitcast=True) - zf) * sf).to(dtype)
        low = tl.reshape(low, [BLOCK_N, BLOCK_KB])
        high = tl.reshape(high, [BLOCK_N, BLOCK_KB])
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_KB, 2]))
        acc = tl.dot(x_even, tl.trans(low), acc)
        acc = tl.dot(x_odd, tl.trans(high), acc)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if SPLIT_K > 1:
        # Each split stores its partial sums; the tile's last to count in adds them up in split
        # order (the sum does not depend on which finished last) and re-arms the counter.
        parts = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(parts + split * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's stores before the release below
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for i in range(SPLIT_K):
                acc += tl.load(parts + i * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(dtype), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(dtype), mask=mask)


# -- DEQUANT_MATMUL: dequantize into a scratch weight, then cuBLAS ----------------------------


@triton.jit
def _dequantize_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, row_bytes, num_groups,
    OUT: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Byte j of row r of `qweight` [N, K // 2] -> columns 2j and 2j + 1 of row r of the 16-bit
    weight, written as one 32-bit word of `w_ptr` (the weight viewed as int32 [N, K // 2]; the
    even column in the low half, as memory is little-endian): loads and stores stay contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < N)[:, None] & (cols < row_bytes)[None, :]
    offs = rows.to(tl.int64)[:, None] * row_bytes + cols[None, :]
    b = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    sz = rows.to(tl.int64)[:, None] * num_groups + (cols // (GROUP // 2))[None, :]
    scale = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    low = (((b & 0xF).to(tl.float32) - zero) * scale).to(OUT)
    high = (((b >> 4).to(tl.float32) - zero) * scale).to(OUT)
    low_bits = low.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high_bits = high.to(tl.int16, bitcast=True).to(tl.int32) << 16
    tl.store(w_ptr + offs, low_bits | high_bits, mask=mask)


_OUT_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dequantize(q: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`, as `pdray.quantization.int4.dequantize` computes it (one
    pass over the int4 codes; float32 through that torch reference)."""
    if dtype not in _OUT_TYPES:
        return reference_dequantize(q, dtype)
    qweight, scales, zeros = (t.contiguous() for t in (q.qweight, q.scales, q.zeros))
    n, row_bytes = qweight.shape
    w = torch.empty((n, 2 * row_bytes), dtype=dtype, device=qweight.device)
    block_r, block_b = 4, 512
    grid = (triton.cdiv(n, block_r), triton.cdiv(row_bytes, block_b))
    _dequantize_kernel[grid](
        qweight, scales, zeros, w.view(torch.int32), n, row_bytes, scales.shape[1],
        OUT=_OUT_TYPES[dtype], GROUP=q.group_size, BLOCK_R=block_r, BLOCK_B=block_b, num_warps=4,
    )  # fmt: skip
    return w


# -- entry point --------------------------------------------------------------------------------


def _check(x: torch.Tensor, q: Int4Weight) -> None:
    n, k_half = q.qweight.shape
    if q.qweight.dtype != torch.uint8:
        raise ValueError(f"qweight must be uint8, not {q.qweight.dtype}")
    if x.shape[-1] != 2 * k_half:
        raise ValueError(f"x has {x.shape[-1]} features, the int4 weight {2 * k_half}")
    if q.group_size not in (32, 64, 128) or q.scales.shape != q.zeros.shape:
        raise ValueError(f"group size {q.group_size} (scales {tuple(q.scales.shape)}, zeros "
                         f"{tuple(q.zeros.shape)}): pdray's int4 kernels take 32, 64 or 128")  # fmt: skip
    if x.dtype not in _DTYPES or q.scales.dtype != x.dtype or q.zeros.dtype != x.dtype:
        raise ValueError(f"x, scales and zeros must share bf16 or fp16; got {x.dtype}, "
                         f"{q.scales.dtype}, {q.zeros.dtype}")  # fmt: skip


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_counters: dict[tuple, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown counters: graphs captured with them still use them


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K arrival counters, zero between launches (the last arrival re-arms its tile's).
    One set per (device, stream): launches on one stream run one after another, so they can
    share; graphs captured on a stream keep theirs."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    counts = _counters.get(key)
    if counts is None or counts.numel() < tiles:
        if counts is not None:
            _retired.append(counts)
        counts = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[key] = counts
    return counts


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


def _x_stationary_gemv(x_pairs, words, scales, zeros, bias_arg, out, num_groups, cfg, is_cuda,
                       x_bf16, **common):  # fmt: skip
    """`_int4_gemv_x_stationary_kernel` over each row of x (one launch a row; M is 1 here)."""
    n = words.shape[0]
    wpc = cfg.words_per_chunk
    block_c = triton.next_power_of_2(num_groups * common["GROUP"] // (8 * wpc))
    tiles = triton.cdiv(n, cfg.block_n)
    grid = (min(tiles, cfg.programs_per_sm * _num_sms(out.device)),)
    common = {k: v for k, v in common.items() if k != "BLOCK_G"}
    for row in range(x_pairs.shape[0]):
        _int4_gemv_x_stationary_kernel[grid](
            x_pairs[row], words, scales, zeros, bias_arg, out[row], n, num_groups,
            words.stride(0), scales.stride(0), INLINE_ASM=cfg.inline_asm and is_cuda,
            X_BF16=x_bf16, BLOCK_C=block_c, WPC=wpc, **common,
        )  # fmt: skip


def int4_linear(
    x: torch.Tensor,
    q: Int4Weight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    path: Int4Path | None = None,
    config: Int4Config | None = None,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias [N]) -> [..., N] in x's dtype, W = `q` dequantized; written into
    `out` ([M, N] contiguous) if given. `path` and `config` override the choice by M."""
    _check(x, q)
    n, k = q.qweight.shape[0], x.shape[-1]
    lead = x.shape[:-1]
    x2 = _unit_stride(x.reshape(-1, k))
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    path = path or choose_path(m)
    if path is Int4Path.DEQUANT_MATMUL:
        # at most _SCRATCH_ELEMENTS of dequantized weight at a time (an int4 LM head would
        # otherwise take a 1 GB scratch): a slice of rows, its columns of out
        rows = max(1, _SCRATCH_ELEMENTS // k)
        for n0 in range(0, n, rows):
            part = Int4Weight(*(t[n0 : n0 + rows] for t in (q.qweight, q.scales, q.zeros)))
            w = dequantize(part, x.dtype).t()
            dst = out if rows >= n else torch.empty((m, w.shape[1]), dtype=x.dtype,
                                                    device=x.device)  # fmt: skip
            if bias is None:
                torch.mm(x2, w, out=dst)
            else:
                torch.addmm(bias[n0 : n0 + rows], x2, w, out=dst)
            if dst is not out:
                out[:, n0 : n0 + rows].copy_(dst)
        return out.reshape(*lead, n)
    qweight, scales, zeros = (_unit_stride(t) for t in (q.qweight, q.scales, q.zeros))
    group, num_groups = q.group_size, scales.shape[1]
    cfg = config or default_config(path, m, group, n, k)
    bias_arg = bias if bias is not None else scales
    common = dict(GROUP=group, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
                  BLOCK_G=cfg.block_groups, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)  # fmt: skip
    if path is Int4Path.GEMV:
        if qweight.stride(0) % 4 or qweight.storage_offset() % 4:
            qweight = qweight.contiguous()
        words = qweight.view(torch.int32)
        if x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte loads of x
            x2 = x2.clone(memory_format=torch.contiguous_format)
        x_pairs = x2.view(torch.int32)
        if cfg.programs_per_sm:
            _x_stationary_gemv(x_pairs, words, scales, zeros, bias_arg, out, num_groups, cfg,
                               x.is_cuda, x.dtype == torch.bfloat16, **common)  # fmt: skip
            return out.reshape(*lead, n)
        grid = (m * triton.cdiv(n, cfg.block_n),)
        _int4_gemv_kernel[grid](
            x_pairs, words, scales, zeros, bias_arg, out, n, num_groups,
            x_pairs.stride(0), words.stride(0), scales.stride(0), out.stride(0),
            INLINE_ASM=cfg.inline_asm and x.is_cuda, X_BF16=x.dtype == torch.bfloat16,
            WPC=cfg.words_per_chunk, **common,
        )  # fmt: skip
    else:
        block_m = max(16, cfg.block_m)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, cfg.block_n)
        split_k = cfg.split_k or triton.cdiv(max(1, cfg.programs_per_sm) * _num_sms(x.device),
                                             tiles)  # fmt: skip
        # each split a whole number of steps; splits past the last group would have no work
        per_split = triton.cdiv(triton.cdiv(num_groups, split_k), cfg.block_groups)
        per_split *= cfg.block_groups
        split_k = triton.cdiv(num_groups, per_split)
        parts = counts = out
        if split_k > 1:
            parts = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
            counts = _tile_counters(x.device, tiles)
        asm, asm_magic = _ASM[x.dtype]
        _int4_gemm_kernel[(tiles, split_k)](
            x2, qweight, scales, zeros, bias_arg, out, parts, counts, m, n, num_groups, per_split,
            x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            INLINE_ASM=cfg.inline_asm and x.is_cuda, ASM=asm, ASM_MAGIC=asm_magic,
            EVEN_G=num_groups % cfg.block_groups == 0 and num_groups % per_split == 0,
            SPLIT_K=split_k, BLOCK_M=block_m, **common,
        )  # fmt: skip
    return out.reshape(*lead, n)
