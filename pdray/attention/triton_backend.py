"""Triton paged attention (the CUDA default), and vLLM's flash-attention when that package imports.

Per step the Triton backend picks one kernel:
- every sequence decodes one token -> split-KV paged decode (`kernels.paged_decode`), launched
  from device tensors only, so a decode step can be captured in a CUDA graph;
- fresh prompts (no cached context) of at least `SDPA_MIN_TOKENS` tokens -> torch's SDPA per
  sequence on K/V read back from the cache (faster than the Triton prefill there; measured, see
  docs/performance.md). cuDNN's SDPA builds a plan for every new sequence length (~50 ms on an
  H200, paid by each request whose prompt length the process had not seen), so prompts under
  `CUDNN_MIN_TOKENS` use the other SDPA kernels (flash: as fast there, no plan), and longer ones
  go to cuDNN padded to a multiple of `CUDNN_LEN_MULTIPLE` (one plan per bucket; causal
  attention leaves the real rows unchanged by keys after them);
- anything else (chunked prefill, prefix-cache hits, mixed batches) -> paged prefill.
Imported only on CUDA hosts: the registry imports this module lazily.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pdray.attention.base import AttentionBackend, AttentionMetadata
from pdray.attention.torch_backend import gather_context
from pdray.kernels.kv_write import write_kv
from pdray.kernels.paged_decode import choose_num_splits, paged_decode_attention
from pdray.kernels.paged_prefill import paged_prefill_attention
from pdray.layers.fused import fused_ops

SDPA_MIN_TOKENS = 1024
CUDNN_MIN_TOKENS = 4096
CUDNN_LEN_MULTIPLE = 1024
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch 2.6+


def _sdpa_backends(backends: list[SDPBackend]):
    """SDPA restricted to `backends`, tried in that order where torch lets us say so."""
    return sdpa_kernel(backends, set_priority=True) if _SET_PRIORITY else sdpa_kernel(backends)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device | str = "cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        self.num_sms = props.multi_processor_count

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv(key, value, kv_cache, meta.slot_mapping)

    def rotate_and_write_kv(self, positions, query, key, value, rope, kv_cache, meta):
        """One launch (`kernels.fused.rotary_write_kv`) unless the fused ops are turned off."""
        fused = fused_ops(query)
        if fused is None:
            return super().rotate_and_write_kv(positions, query, key, value, rope, kv_cache, meta)
        return fused.rotary_write_kv(positions, query, key, value, rope.cos, rope.sin,
                                     rope.interleaved, kv_cache, meta.slot_mapping)  # fmt: skip

    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        if meta.max_query_len == 1:
            num_splits = choose_num_splits(
                query.shape[0], kv_cache.shape[3], meta.max_seq_len, self.num_sms
            )
            return paged_decode_attention(
                query, kv_cache, meta.block_tables, meta.seq_lens, scale, sliding_window, num_splits
            )
        if self._fresh_prompts(meta, sliding_window):
            return self._sdpa(query, kv_cache, meta, scale)
        return paged_prefill_attention(
            query,
            kv_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            scale,
            sliding_window,
        )

    @staticmethod
    def _fresh_prompts(meta: AttentionMetadata, sliding_window: int | None) -> bool:
        if meta.max_query_len < SDPA_MIN_TOKENS or meta.query_lens_cpu != meta.seq_lens_cpu:
            return False
        return sliding_window is None or meta.max_seq_len <= sliding_window

    @staticmethod
    def _sdpa(
        query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        start = 0
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            k, v = gather_context(kv_cache, meta.block_tables[i], seq_len)  # [L, Hkv, D]
            q = query[start : start + seq_len]  # [L, Hq, D]
            out[start : start + seq_len] = causal_sdpa(q, k, v, scale)
            start += seq_len
        return out


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one fresh sequence: q [L, Hq, D], k and v [L, Hkv, D] -> [L, Hq, D].
    Below CUDNN_MIN_TOKENS without cuDNN; from there cuDNN on L padded up to a multiple of
    CUDNN_LEN_MULTIPLE (the padded rows come after every real one, so no real row sees them)."""
    seq_len = q.shape[0]
    if seq_len < CUDNN_MIN_TOKENS:
        backends, padded = _NO_CUDNN, seq_len
    else:
        backends = [SDPBackend.CUDNN_ATTENTION, *_NO_CUDNN]
        padded = -(-seq_len // CUDNN_LEN_MULTIPLE) * CUDNN_LEN_MULTIPLE
    if padded != seq_len:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - seq_len)) for t in (q, k, v))
    with _sdpa_backends(backends):
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, L, D]
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )  # [1, Hq, L, D]
    return o[0, :, :seq_len].transpose(0, 1)


class VllmFlashAttnBackend(TritonAttentionBackend):
    """vLLM's flash-attention over the same paged cache (block_size a multiple of 16).

    Only offered when `vllm_flash_attn` imports; it was not installed on the machines this was
    measured on, so it carries no measured figures.
    """

    name = "vllm_flash_attn"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device | str = "cuda"):
        super().__init__(device)
        from vllm_flash_attn import flash_attn_varlen_func

        self._flash = flash_attn_varlen_func

    def forward(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        return self._flash(
            q=query,
            k=kv_cache[0],
            v=kv_cache[1],
            cu_seqlens_q=meta.query_start_loc,
            seqused_k=meta.seq_lens,
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale,
            causal=True,
            window_size=window,
            block_table=meta.block_tables,
        )
