"""The transformers baseline of the engine benchmark: `generate` at batch 1 on the runner's weights."""

from __future__ import annotations

import torch

from pdray.bench.timing import wall_median_ms
from pdray.worker.model_runner import ModelRunner


def hf_decode_ms_per_token(runner: ModelRunner, context_len: int, new_tokens: int = 32) -> float:
    """transformers' `generate` (greedy, batch 1) on the runner's weights: ms per decoded token,
    (time for 1 + new_tokens tokens - time for 1) / new_tokens after a prompt of context_len."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = runner.arch
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(runner.dtype)
    try:
        with torch.device(runner.device):
            hf = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=arch.vocab_size,
                    hidden_size=arch.hidden_size,
                    intermediate_size=arch.intermediate_size,
                    num_hidden_layers=arch.num_layers,
                    num_attention_heads=arch.num_heads,
                    num_key_value_heads=arch.num_kv_heads,
                    max_position_embeddings=arch.max_position_embeddings,
                    rms_norm_eps=arch.rms_norm_eps,
                    tie_word_embeddings=arch.tie_word_embeddings,
                )
            ).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    _copy_weights_to_hf(runner.model, hf)
    ids = torch.randint(3, arch.vocab_size, (1, context_len), device=runner.device)

    def generate(n: int, hf=hf) -> None:
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip

    with torch.inference_mode():
        one = wall_median_ms(lambda: generate(1), 3, warmup=1)
        many = wall_median_ms(lambda: generate(1 + new_tokens), 3, warmup=1)
    del hf
    torch.cuda.empty_cache()
    return (many - one) / new_tokens


@torch.no_grad()
def _copy_weights_to_hf(model, hf) -> None:
    ours = model.model
    hf.model.embed_tokens.weight.copy_(ours.embed_tokens.weight)
    hf.model.norm.weight.copy_(ours.norm.weight)
    hf.lm_head.weight.copy_(model.lm_head.weight)
    for mine, theirs in zip(ours.layers, hf.model.layers, strict=True):
        attn, mlp = mine.self_attn, mine.mlp
        q, k, v = attn.qkv_proj.weight.split(
            [attn.qkv_proj.q_size, attn.qkv_proj.kv_size, attn.qkv_proj.kv_size]
        )
        theirs.self_attn.q_proj.weight.copy_(q)
        theirs.self_attn.k_proj.weight.copy_(k)
        theirs.self_attn.v_proj.weight.copy_(v)
        theirs.self_attn.o_proj.weight.copy_(attn.o_proj.weight)
        gate, up = mlp.gate_up_proj.weight.chunk(2)
        theirs.mlp.gate_proj.weight.copy_(gate)
        theirs.mlp.up_proj.weight.copy_(up)
        theirs.mlp.down_proj.weight.copy_(mlp.down_proj.weight)
        theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight)
        theirs.post_attention_layernorm.weight.copy_(mine.post_attention_layernorm.weight)
