"""The transformers baseline of the engine benchmark: `generate` at batch 1 on the runner's weights.

A speed ratio means something only if both sides computed the same thing, so the baseline also
checks tokens: after timing, transformers generates `new_tokens` greedy tokens once more after the
same prompt (keeping its logits), and the runner does the same (prefill, then decode steps through
`runner.execute`, eager, in a KV cache of its own). `TokenCheck` records whether the tokens are the
same and, where they first differ, how far apart transformers' logits were there (a near-tie of a
reduced-precision run, or a real difference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pdray.bench.timing import wall_median_ms
from pdray.worker.batch import SamplingRow, StepBatch
from pdray.worker.model_runner import ModelRunner


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """Greedy tokens of transformers and of pdray after one prompt, compared."""

    same_tokens: bool
    num_tokens: int
    first_mismatch: int | None = None  # index of the first new token that differs
    hf_top2_gap: float | None = None  # transformers' top-1 - top-2 logit there
    hf_gap_to_pdray_token: float | None = None  # transformers' top-1 - logit of pdray's token

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.same_tokens:
            return f"transformers and pdray generated the same {self.num_tokens} greedy tokens"
        return (
            f"transformers and pdray greedy tokens differ from new token {self.first_mismatch} "
            f"of {self.num_tokens} (transformers' logits there: top-1 - top-2 "
            f"{self.hf_top2_gap:.4g}, top-1 - pdray's token {self.hf_gap_to_pdray_token:.4g})"
        )


def hf_decode_ms_per_token(
    runner: ModelRunner, context_len: int, new_tokens: int = 32
) -> tuple[float, TokenCheck]:
    """transformers' `generate` (greedy, batch 1) on the runner's weights: ms per decoded token,
    (time for 1 + new_tokens tokens - time for 1) / new_tokens after a prompt of context_len; and
    the check of its greedy tokens against the runner's after the same prompt. Leaves a KV cache
    for context_len + new_tokens tokens bound to the runner (allocate your own afterwards)."""
    hf = build_hf_llama(runner)
    ids = torch.randint(3, runner.arch.vocab_size, (1, context_len), device=runner.device)

    def generate(n: int, hf=hf) -> None:
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # fmt: skip

    with torch.inference_mode():
        one = wall_median_ms(lambda: generate(1), 3, warmup=1)
        many = wall_median_ms(lambda: generate(1 + new_tokens), 3, warmup=1)
        hf_tokens, hf_logits = hf_greedy(hf, ids, new_tokens)
    del hf
    torch.cuda.empty_cache()
    prompt = ids[0].tolist()
    check = compare_tokens(hf_tokens, hf_logits, pdray_greedy(runner, prompt, new_tokens))
    return (many - one) / new_tokens, check


def build_hf_llama(runner: ModelRunner):
    """A transformers Llama of the runner's shapes, rotary and dtype, holding its weights."""
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
                    head_dim=arch.head_dim,
                    max_position_embeddings=arch.max_position_embeddings,
                    rms_norm_eps=arch.rms_norm_eps,
                    rope_theta=arch.rope_theta,
                    rope_scaling=arch.rope_scaling,
                    tie_word_embeddings=arch.tie_word_embeddings,
                )
            ).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    _copy_weights_to_hf(runner.model, hf)
    return hf


def hf_greedy(hf, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens after `ids` [1, T] (EOS not special) and the logits
    [new_tokens, vocab] each was chosen from."""
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    return tokens, torch.stack([row[0] for row in out.logits]).float().cpu()


def pdray_greedy(runner: ModelRunner, prompt: list[int], new_tokens: int) -> list[int]:
    """The runner's greedy tokens after `prompt`: one prefill step, then one decode step per token,
    in a fresh KV cache of just enough blocks (contiguous: token p in slot p)."""
    block_size = runner.config.block_size
    runner.allocate_kv_cache(-(-(len(prompt) + new_tokens) // block_size))
    row = SamplingRow(seq_id="hf-baseline-check", temperature=0.0)
    tokens: list[int] = []
    step_ids, start = list(prompt), 0
    while len(tokens) < new_tokens:
        positions = list(range(start, start + len(step_ids)))
        seq_len = positions[-1] + 1
        batch = StepBatch(
            input_ids=step_ids, positions=positions, slot_mapping=positions,
            query_lens=[len(step_ids)], seq_lens=[seq_len],
            block_tables=[list(range(-(-seq_len // block_size)))], sample_indices=[0],
            sampling_rows=[row],
        )  # fmt: skip
        [sampled] = runner.execute(batch)
        tokens.append(sampled.token_id)
        step_ids, start = [sampled.token_id], seq_len
    runner.sampler.free([row.seq_id])
    return tokens


def compare_tokens(hf_tokens: list[int], hf_logits: torch.Tensor, tokens: list[int]) -> TokenCheck:
    if tokens == hf_tokens:
        return TokenCheck(same_tokens=True, num_tokens=len(tokens))
    pos = next(
        (i for i, (a, b) in enumerate(zip(hf_tokens, tokens, strict=False)) if a != b),
        min(len(hf_tokens), len(tokens)),
    )
    if pos >= len(hf_logits) or pos >= len(tokens):  # one is a prefix of the other
        return TokenCheck(same_tokens=False, num_tokens=len(tokens), first_mismatch=pos)
    logits = hf_logits[pos]
    top2 = logits.topk(2).values
    return TokenCheck(
        same_tokens=False,
        num_tokens=len(tokens),
        first_mismatch=pos,
        hf_top2_gap=(top2[0] - top2[1]).item(),
        hf_gap_to_pdray_token=(logits.max() - logits[tokens[pos]]).item(),
    )


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
