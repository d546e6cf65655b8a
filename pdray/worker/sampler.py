"""Turns one step's logits into sampled tokens, one row per sequence that samples.

When every row is plain greedy (temperature 0, no logprobs, penalties or banned tokens), the
tokens are the logits' argmax, taken on the device (or given: the decode graph computes it), and
only those [S] ids come back to the host: no float copy of the logits.

Otherwise, per row, in order: logprobs of the raw distribution (when asked), penalties, banned
tokens, then greedy argmax or temperature / min_p / top_k / top_p and a draw. The draw is an
exponential race, argmax(p / q) with q ~ Exp(1), which picks token i with probability p_i. Rows
with a seed draw their q from a generator of their own, kept across steps, so their tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pdray.worker.batch import SampledToken, SamplingRow

_GREEDY_TEMPERATURE = 1e-5


def _uses_penalties(row: SamplingRow) -> bool:
    return (
        row.repetition_penalty != 1.0 or row.presence_penalty != 0.0 or row.frequency_penalty != 0.0
    )


def is_plain_greedy(row: SamplingRow) -> bool:
    """Whether row's token is just the argmax of its logits."""
    return (
        row.temperature < _GREEDY_TEMPERATURE
        and row.num_logprobs is None
        and not row.banned_token_ids
        and not _uses_penalties(row)
    )


def _to_device(
    values: list[int] | list[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    on_host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return on_host
    # From pinned memory the copy is queued on the stream instead of waiting for it.
    return on_host.pin_memory().to(device, non_blocking=True)


class Sampler:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}
        self._host_ids: torch.Tensor | None = None  # pinned, for token ids coming back (CUDA)
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None

    def free(self, seq_ids: Iterable[str]) -> None:
        for seq_id in seq_ids:
            self._generators.pop(seq_id, None)

    def export_state(self, seq_id: str) -> bytes | None:
        """RNG state of a seeded sequence, so another engine continues the same stream."""
        generator = self._generators.get(seq_id)
        return None if generator is None else bytes(generator.get_state().tolist())

    def import_state(self, seq_id: str, state: bytes) -> None:
        generator = torch.Generator(device=self.device)
        generator.set_state(torch.tensor(list(state), dtype=torch.uint8))
        self._generators[seq_id] = generator

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        argmax: torch.Tensor | None = None,
    ) -> list[SampledToken]:
        """One token per row of logits [S, V]; argmax [S], if given, is logits.argmax(-1)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if not rows:
            return []
        if all(is_plain_greedy(row) for row in rows):
            ids = logits.argmax(dim=-1) if argmax is None else argmax
            return [SampledToken(token_id) for token_id in self._to_host(ids)]
        logits = logits.to(dtype=torch.float32, copy=True)
        logprob_rows = [i for i, row in enumerate(rows) if row.num_logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            raw_logprobs = torch.log_softmax(logits[self._index(logprob_rows, logits)], dim=-1)
        self._apply_penalties(logits, rows)
        self._apply_bans(logits, rows)
        token_ids = self._sample(logits, rows)
        return self._results(token_ids, rows, logprob_rows, raw_logprobs)

    def _to_host(self, token_ids: torch.Tensor) -> list[int]:
        """[S] ids on the device as a list: one small copy, one wait for it."""
        if self._copied is None:
            return token_ids.tolist()
        n = token_ids.shape[0]
        if self._host_ids is None or self._host_ids.shape[0] < n:
            self._host_ids = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
        host = self._host_ids[:n]
        host.copy_(token_ids, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()
        return host.tolist()

    def _index(self, indices: list[int], like: torch.Tensor) -> torch.Tensor:
        return _to_device(indices, torch.long, like.device)

    def _column(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        return _to_device(values, torch.float32, like.device).unsqueeze(1)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        penalized = [i for i, row in enumerate(rows) if _uses_penalties(row)]
        if not penalized:
            return
        vocab_size = logits.shape[1]
        output_counts = self._token_counts(
            [rows[i].output_token_ids or [] for i in penalized], vocab_size, logits
        )
        prompt_counts = self._token_counts(
            [rows[i].prompt_token_ids or [] for i in penalized], vocab_size, logits
        )
        index = self._index(penalized, logits)
        selected = logits[index]
        repetition = self._column([rows[i].repetition_penalty for i in penalized], logits)
        presence = self._column([rows[i].presence_penalty for i in penalized], logits)
        frequency = self._column([rows[i].frequency_penalty for i in penalized], logits)
        seen = (output_counts > 0) | (prompt_counts > 0)
        penalized_logits = torch.where(selected > 0, selected / repetition, selected * repetition)
        selected = torch.where(seen, penalized_logits, selected)
        selected = selected - presence * (output_counts > 0).float() - frequency * output_counts
        logits[index] = selected

    def _token_counts(
        self, token_lists: list[list[int]], vocab_size: int, like: torch.Tensor
    ) -> torch.Tensor:
        row_indices: list[int] = []
        token_ids: list[int] = []
        for row_index, tokens in enumerate(token_lists):
            for token_id in tokens:
                if 0 <= token_id < vocab_size:
                    row_indices.append(row_index)
                    token_ids.append(token_id)
        counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=like.device)
        if token_ids:
            ones = torch.ones(len(token_ids), dtype=torch.float32, device=like.device)
            counts.index_put_(
                (self._index(row_indices, like), self._index(token_ids, like)),
                ones,
                accumulate=True,
            )
        return counts

    def _apply_bans(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        vocab_size = logits.shape[1]
        row_indices: list[int] = []
        token_ids: list[int] = []
        for row_index, row in enumerate(rows):
            for token_id in row.banned_token_ids:
                if 0 <= token_id < vocab_size:
                    row_indices.append(row_index)
                    token_ids.append(token_id)
        if token_ids:
            index = (self._index(row_indices, logits), self._index(token_ids, logits))
            banned = torch.full((len(token_ids),), -torch.inf, device=logits.device)
            logits.index_put_(index, banned)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, row in enumerate(rows) if row.temperature < _GREEDY_TEMPERATURE]
        random = [i for i, row in enumerate(rows) if row.temperature >= _GREEDY_TEMPERATURE]
        if greedy:
            greedy_index = self._index(greedy, logits)
            token_ids[greedy_index] = logits[greedy_index].argmax(dim=-1)
        if random:
            random_rows = [rows[i] for i in random]
            random_index = self._index(random, logits)
            probs = self._filtered_probs(logits[random_index], random_rows)
            token_ids[random_index] = self._race(probs, random_rows)
        return token_ids

    def _filtered_probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        logits = logits / self._column([row.temperature for row in rows], logits)
        if any(row.min_p > 0 for row in rows):
            probs = torch.softmax(logits, dim=-1)
            min_p = self._column([row.min_p for row in rows], logits)
            threshold = min_p * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < threshold, -torch.inf)
        if any(row.top_k > 0 or row.top_p < 1.0 for row in rows):
            logits = self._top_k_top_p(logits, rows)
        return torch.softmax(logits, dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab_size = logits.shape[1]
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        top_k = [row.top_k if 0 < row.top_k < vocab_size else vocab_size for row in rows]
        positions = torch.arange(vocab_size, device=logits.device).unsqueeze(0)
        beyond_k = positions >= self._index(top_k, logits).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(beyond_k, -torch.inf)
        if any(row.top_p < 1.0 for row in rows):
            top_p = self._column([row.top_p if row.top_p < 1.0 else 2.0 for row in rows], logits)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, -torch.inf)
        return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)

    def _race(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        waits = torch.empty_like(probs)
        if any(row.seed is None for row in rows):
            waits.exponential_()
        for row_index, row in enumerate(rows):
            if row.seed is not None:
                waits[row_index].exponential_(generator=self._generator(row))
        # A zero wait would turn a filtered-out token's 0 / 0 into NaN, which argmax prefers.
        waits.clamp_min_(torch.finfo(torch.float32).tiny)
        return (probs / waits).argmax(dim=-1)

    def _generator(self, row: SamplingRow) -> torch.Generator:
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row.seed)
            self._generators[row.seq_id] = generator
        return generator

    def _results(
        self,
        token_ids: torch.Tensor,
        rows: list[SamplingRow],
        logprob_rows: list[int],
        raw_logprobs: torch.Tensor | None,
    ) -> list[SampledToken]:
        if raw_logprobs is None:
            return [SampledToken(token_id=token_id) for token_id in token_ids.tolist()]
        chosen_ids = token_ids[self._index(logprob_rows, token_ids)].unsqueeze(1)
        chosen_logprobs = raw_logprobs.gather(1, chosen_ids)
        ranks = (raw_logprobs > chosen_logprobs).sum(dim=-1) + 1
        max_k = min(max(rows[i].num_logprobs or 0 for i in logprob_rows), raw_logprobs.shape[1])
        top_logprobs, top_ids = raw_logprobs.topk(max_k, dim=-1)
        results = [SampledToken(token_id=token_id) for token_id in token_ids.tolist()]
        chosen_list = chosen_logprobs.squeeze(1).tolist()
        rank_list = ranks.tolist()
        top_logprob_list = top_logprobs.tolist()
        top_id_list = top_ids.tolist()
        for slot, row_index in enumerate(logprob_rows):
            num_top = rows[row_index].num_logprobs or 0
            result = results[row_index]
            result.logprob = chosen_list[slot]
            result.rank = rank_list[slot]
            result.top_logprobs = list(
                zip(top_id_list[slot][:num_top], top_logprob_list[slot][:num_top], strict=True)
            )
        return results
