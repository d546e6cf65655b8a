"""Scores prompt tokens (SamplingParams.prompt_logprobs): the LM head over a request's prompt
positions, only for the rows a StepBatch names, in chunks of bounded size.

Logprobs are of the model's raw distribution (log_softmax of the float32 logits), as for the
sampled tokens' logprobs; a rank is 1 + the number of tokens strictly more likely. Every
tensor-parallel rank runs the same LM head calls (their all-gather needs each rank); only the
rank that keeps the results turns them into lists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdray.worker.batch import PromptLogprobRow, PromptLogprobs


def score_prompts(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,  # [T, H]: the step's flattened hidden states
    rows: list[PromptLogprobRow],
    *,
    max_rows_per_call: int,
    keep: bool,
) -> list[PromptLogprobs]:
    """One PromptLogprobs per row (none if not `keep`)."""
    token_index: list[int] = []
    target_ids: list[int] = []
    num_top: list[int] = []
    for row in rows:
        token_index += range(row.first_token_index, row.first_token_index + len(row.target_ids))
        target_ids += row.target_ids
        num_top += [row.num_logprobs] * len(row.target_ids)
    logprobs: list[float] = []
    ranks: list[int] = []
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    device = hidden.device
    for start in range(0, len(token_index), max_rows_per_call):
        end = start + max_rows_per_call
        index = torch.tensor(token_index[start:end], dtype=torch.long, device=device)
        logits = compute_logits(hidden[index])  # [R, V]
        if not keep:
            continue
        raw = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(target_ids[start:end], dtype=torch.long, device=device)
        chosen = raw.gather(1, targets.unsqueeze(1))  # [R, 1]
        logprobs += chosen.squeeze(1).tolist()
        ranks += ((raw > chosen).sum(dim=-1) + 1).tolist()
        ks = num_top[start:end]
        max_k = min(max(ks), raw.shape[1])
        if max_k:
            values, ids = raw.topk(max_k, dim=-1)
            for k, v, i in zip(ks, values.tolist(), ids.tolist(), strict=True):
                top_logprobs.append(v[:k])
                top_ids.append(i[:k])
        else:
            top_logprobs += [[] for _ in ks]
            top_ids += [[] for _ in ks]
    if not keep:
        return []
    results, offset = [], 0
    for row in rows:
        span = slice(offset, offset + len(row.target_ids))
        offset = span.stop
        results.append(
            PromptLogprobs(logprobs[span], ranks[span], top_ids[span], top_logprobs[span])
        )
    return results
