"""The Llama-style decoder shared by Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 and ERNIE 4.5 dense.

Families differ only in flags of `ModelArch`: QKV bias (Qwen2), per-head q/k RMSNorm and explicit
head_dim (Qwen3), interleaved rotary and optional biases (ERNIE 4.5), rope scaling (Llama 3.1+),
a sliding window (Mistral on every layer, Qwen on the layers its config marks).
Shapes: T = tokens in the step (all sequences flattened), H = hidden size, D = head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from pdray.attention.layer import Attention
from pdray.layers.activation import SiluAndMul
from pdray.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pdray.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pdray.layers.norm import RMSNorm
from pdray.layers.rotary import RotaryEmbedding
from pdray.models.config import ModelArch
from pdray.quantization.spec import Int4Spec


class DecoderAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, int4: Int4Spec | None = None):
        super().__init__()
        d = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, d, arch.num_heads, arch.num_kv_heads, bias=arch.qkv_bias, int4=int4
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            arch.num_heads * d, arch.hidden_size, bias=arch.o_bias, int4=int4
        )
        self.q_norm = RMSNorm(d, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(d, arch.rms_norm_eps) if arch.qk_norm else None
        self.rotary = RotaryEmbedding(
            d,
            arch.max_position_embeddings,
            arch.rope_theta,
            arch.rope_scaling,
            interleaved=arch.rope_interleaved,
        )
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.num_kv_heads,
            d,
            d**-0.5,
            arch.layer_sliding_window(layer_idx),
        )
        self.head_dim = d

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hkv) D]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, rope=self.rotary, positions=positions))


class DecoderMLP(nn.Module):
    def __init__(self, arch: ModelArch, int4: Int4Spec | None = None):
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size, [size, size], bias=arch.mlp_bias, int4=int4
        )
        self.down_proj = RowParallelLinear(size, arch.hidden_size, bias=arch.mlp_bias, int4=int4)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, int4: Int4Spec | None = None):
        super().__init__()
        self.self_attn = DecoderAttention(arch, layer_idx, int4)
        self.mlp = DecoderMLP(arch, int4)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, int4: Int4Spec | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, int4) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id) for projections merged into one matmul
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArch, int4: Int4Spec | None = None):
        """`int4`: the linear layers' int4 weights (pdray/quantization/spec.py); None: full
        precision. Embeddings and the LM head stay full precision either way."""
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch, int4)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, V]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
