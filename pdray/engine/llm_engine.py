"""The engine loop: requests in, one scheduled forward per `step()`, outputs out.

Request lifecycle:  add_request (validated, nothing changes on error) -> sequences queued ->
steps compute them -> each sampled token is detokenized and checked against the stop
conditions -> a finished sequence frees its blocks (or, in the prefill role, holds them until
`release`) -> the request is dropped once all its sequences have finished.

Prompt logprobs: a request with SamplingParams.prompt_logprobs computes its whole prompt (no prefix
hits); the steps that compute sequence 0's prompt chunks also score them (StepBatch rows, the LM
head over those positions only), and its outputs carry them once every position is scored. A
decode engine never scores: the prefill engine's first-token output carries them.

Role hooks used by KV transfer:
  prefill: every sequence ends after its first token with its blocks HELD; `held_block_table`
           tells what to send, `release(request_id)` frees them.
  decode:  `reserve_remote` allocates a request's prompt blocks (prefix hits reused) and says
           which must be written from elsewhere; `admit_remote` starts decoding once they are;
           `abort_request` frees the reservation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pdray.config import EngineConfig, Role
from pdray.engine.block_manager import BlockManager
from pdray.engine.block_table_rows import BlockTableRows
from pdray.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from pdray.engine.request import PromptScores, Request, SeqOutputState
from pdray.engine.scheduler import Scheduler, SchedulerOutput
from pdray.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdray.outputs import Logprob, RequestOutput
from pdray.sampling_params import SamplingParams
from pdray.tokenizer import load_tokenizer
from pdray.worker.batch import (
    PromptLogprobRow,
    PromptLogprobs,
    SampledToken,
    SamplingRow,
    StepBatch,
)
from pdray.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RemoteReservation:
    """Where a decode engine expects one sequence's prompt KV."""

    seq_id: str
    block_table: list[int]
    num_cached_tokens: int  # prompt tokens already here (prefix hits); KV needed from here on


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.arch = self.runner.arch
        self.tokenizer = load_tokenizer(config.model, config.tokenizer, self.arch.vocab_size)
        self.eos_token_ids = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and (
            not self.eos_token_ids or config.model.startswith("dummy:")
        ):
            self.eos_token_ids = {self.tokenizer.eos_token_id}
        self.max_model_len = self._max_model_len()
        num_blocks = self.runner.num_blocks_to_allocate(self.max_model_len)
        self._check_cache_fits(num_blocks)
        self.runner.allocate_kv_cache(num_blocks, self.max_model_len)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            first_chunk_tokens=config.first_chunk_tokens,
        )
        self.requests: dict[str, Request] = {}
        self._seq_to_request: dict[str, Request] = {}
        self._finished_seq_ids: list[str] = []
        # Each running sequence's row of the runner's persistent block tables (StepBatch).
        self._table_rows = BlockTableRows(
            config.max_num_seqs, -(-self.max_model_len // config.block_size)
        )
        # A sequence's SamplingRow while it does not change from step to step.
        self._sampling_rows: dict[str, tuple[Sequence, SamplingRow]] = {}
        # KV transfer (prefill role) watches each step's plan: begin_step(scheduled), end_step().
        self.step_observer = None

    def _max_model_len(self) -> int:
        model_max = self.arch.max_position_embeddings
        if self.config.max_model_len is None:
            return model_max
        if self.config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={self.config.max_model_len} exceeds the model's "
                f"max_position_embeddings ({model_max})"
            )
        return self.config.max_model_len

    def _check_cache_fits(self, num_blocks: int) -> None:
        capacity = num_blocks * self.config.block_size
        if capacity >= self.max_model_len:
            return
        if self.config.max_model_len is not None:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks), fewer than "
                f"max_model_len={self.max_model_len}; lower max_model_len or give the cache more memory"
            )
        logger.warning("max_model_len lowered to %d tokens to fit the KV cache", capacity)
        self.max_model_len = capacity

    # -- requests -----------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (and changes nothing) on bad input."""
        request = self._make_request(request_id, prompt, sampling_params)
        self._register(request)
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _make_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        params.validate()
        text, token_ids = self._tokenize(prompt)
        # A decode engine never scores the prompt: prefill's first output carries its logprobs.
        scores = params.prompt_logprobs is not None and self.config.role is not Role.DECODE
        seqs, states = [], []
        for i in range(params.n):
            seq = Sequence(
                seq_id=request_id if params.n == 1 else f"{request_id}#{i}",
                request_id=request_id,
                index=i,
                token_ids=list(token_ids),
                num_prompt_tokens=len(token_ids),
                sampling_params=params,
                reuse_prefix_cache=not scores,
            )
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            seqs.append(seq)
            states.append(
                SeqOutputState(detok, logprobs=[] if params.logprobs is not None else None)
            )
        request = Request(request_id, text, list(token_ids), params, seqs, states)
        if scores:
            request.prompt_scores = PromptScores.for_prompt(len(token_ids))
        return request

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            text, token_ids = None, list(prompt)
            bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})"
                )
        else:
            raise ValueError("a prompt must be a string or a list of token ids")
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token"
            )
        return text, token_ids

    def _register(self, request: Request) -> None:
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self._seq_to_request[seq.seq_id] = request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.abort(seq)
            self._forget(seq)
        return request.to_output()

    def _forget(self, seq: Sequence) -> None:
        if self._seq_to_request.pop(seq.seq_id, None) is not None:
            self._finished_seq_ids.append(seq.seq_id)

    def close(self) -> None:
        """Release what outlives the object: the other ranks of a tensor-parallel engine."""
        self.runner.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # -- the loop -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward; return the outputs of requests that produced tokens or finished."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            if self._finished_seq_ids:
                self.runner.execute(self._build_batch(out))
            return []
        batch = self._build_batch(out)
        sampling = [item.seq for item in out.scheduled if item.samples]
        if self.step_observer is not None:
            self.step_observer.begin_step(out.scheduled)
        result = self.runner.execute_step(batch)
        if self.step_observer is not None:
            self.step_observer.end_step()
        self.scheduler.update_after_step(out)
        for row, scored in zip(batch.prompt_logprob_rows, result.prompt_logprobs, strict=True):
            self._record_prompt_logprobs(row, scored)
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for seq, token in zip(sampling, result.sampled, strict=True):
            request = self._seq_to_request[seq.seq_id]
            if request.first_token_time_s is None:
                request.first_token_time_s = now
            self._append_token(request, seq, token)
            touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            outputs.append(request.to_output())
            if request.finished:
                self._complete(request)
        return outputs

    def _complete(self, request: Request) -> None:
        if self.config.role is not Role.PREFILL:
            del self.requests[request.request_id]
            for seq in request.seqs:
                self._forget(seq)

    def _build_batch(self, out: SchedulerOutput) -> StepBatch:
        bs = self.config.block_size
        finished, self._finished_seq_ids = self._finished_seq_ids, []
        self._table_rows.free(finished)
        self._table_rows.free(seq.seq_id for seq in out.preempted)
        for seq_id in finished:
            self._sampling_rows.pop(seq_id, None)
        batch = StepBatch([], [], [], [], [], [], [], finished_seq_ids=finished)
        now_s = time.monotonic()
        for i, item in enumerate(out.scheduled):
            seq, start, num_new = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            table = seq.block_table
            batch.table_rows.append(
                self._table_rows.row_of(seq, batch.table_clears, batch.table_writes)
            )
            if num_new == 1 and start >= seq.num_prompt_tokens:  # decode: no prompt to score
                batch.input_ids.append(seq.token_ids[start])
                batch.positions.append(start)
                batch.slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                self._add_prompt_tokens(batch, seq, start, start + num_new, now_s)
            batch.query_lens.append(num_new)
            batch.seq_lens.append(start + num_new)
            if item.samples:
                batch.sample_indices.append(i)
                batch.sampling_rows.append(self._sampling_row(seq))
        return batch

    def _add_prompt_tokens(
        self, batch: StepBatch, seq: Sequence, start: int, end: int, now_s: float
    ) -> None:
        """Tokens [start, end) of a sequence computing its prompt (or recomputing it)."""
        bs = self.config.block_size
        if seq.num_output_tokens == 0:  # a prompt (chunk): when did it first run?
            request = self._seq_to_request[seq.seq_id]
            if request.scheduled_time_s is None:
                request.scheduled_time_s = now_s
        self._add_prompt_logprob_row(batch, seq, start, end)
        table = seq.block_table
        batch.input_ids += seq.token_ids[start:end]
        batch.positions += range(start, end)
        batch.slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _add_prompt_logprob_row(self, batch: StepBatch, seq: Sequence, start: int, end: int):
        """Score the prompt positions in [start, end) whose next token is a prompt token (call
        before the chunk's tokens join the batch)."""
        request = self._seq_to_request[seq.seq_id]
        stop = min(end, seq.num_prompt_tokens - 1)
        if stop <= start or not request.needs_prompt_scores(seq):
            return
        batch.prompt_logprob_rows.append(
            PromptLogprobRow(
                seq.seq_id, len(batch.input_ids), start, seq.token_ids[start + 1 : stop + 1],
                seq.sampling_params.prompt_logprobs,
            )
        )  # fmt: skip

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        cached = self._sampling_rows.get(seq.seq_id)
        if cached is not None and cached[0] is seq:
            return cached[1]
        p = seq.sampling_params
        banned = []
        if seq.num_output_tokens < p.min_tokens:
            banned = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        seed = None if p.seed is None else p.seed + seq.index
        row = SamplingRow(
            seq.seq_id, p.temperature, p.top_p, p.top_k, p.min_p, seed,
            p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            p.logprobs, banned,
        )  # fmt: skip
        if p.uses_penalties:
            row.prompt_token_ids = seq.prompt_token_ids
            row.output_token_ids = seq.output_token_ids
        elif not banned:  # the same row every later step: keep it until the sequence ends
            self._sampling_rows[seq.seq_id] = (seq, row)
        return row

    # -- per-token output processing ----------------------------------------------------------------

    def _append_token(self, request: Request, seq: Sequence, token: SampledToken) -> None:
        state = request.states[seq.index]
        seq.token_ids.append(token.token_id)
        delta = state.detokenizer.add_token(token.token_id)
        state.text += delta
        if state.logprobs is not None:
            self._record_logprobs(state, token)
        reason = self._stop_reason(seq, state, len(delta))
        if self.config.role is Role.PREFILL:
            # Hand-off point: blocks stay until released; no reason means decode continues it.
            self.scheduler.finish(seq, reason, hold=True)
        elif reason is not None:
            self.scheduler.finish(seq, reason)

    def _record_logprobs(self, state: SeqOutputState, token: SampledToken) -> None:
        entry = {
            token.token_id: Logprob(token.logprob, token.rank, self._decode_one(token.token_id))
        }
        for rank, (tid, lp) in enumerate(token.top_logprobs or [], start=1):
            entry.setdefault(tid, Logprob(lp, rank, self._decode_one(tid)))
        state.logprobs.append(entry)
        state.cumulative_logprob = (state.cumulative_logprob or 0.0) + token.logprob

    def _record_prompt_logprobs(self, row: PromptLogprobRow, scored: PromptLogprobs) -> None:
        scores = self._seq_to_request[row.seq_id].prompt_scores
        decoded: dict[int, str] = {}

        def text(token_id: int) -> str:
            if token_id not in decoded:
                decoded[token_id] = self._decode_one(token_id)
            return decoded[token_id]

        for j, target in enumerate(row.target_ids):
            entry = {target: Logprob(scored.logprobs[j], scored.ranks[j], text(target))}
            top = zip(scored.top_ids[j], scored.top_logprobs[j], strict=True)
            for rank, (tid, lp) in enumerate(top, start=1):
                entry.setdefault(tid, Logprob(lp, rank, text(tid)))
            scores.set(row.first_position + j + 1, entry)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _stop_reason(self, seq: Sequence, state: SeqOutputState, num_new_chars: int):
        p = seq.sampling_params
        token = seq.token_ids[-1]
        if seq.num_output_tokens >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return FinishReason.STOP
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return FinishReason.STOP
            if p.stop:
                found = find_stop_string(state.text, num_new_chars, p.stop)
                if found is not None:
                    stop, start = found
                    end = start + len(stop) if p.include_stop_str_in_output else start
                    state.text = state.text[:end]
                    seq.stop_reason = stop
                    return FinishReason.STOP
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        if len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- prefill role --------------------------------------------------------------------------------

    def held_block_table(self, seq_id: str) -> list[int]:
        return list(self.scheduler.held[seq_id].block_table)

    def release(self, request_id: str) -> None:
        """Free the held blocks of a finished prefill request (idempotent)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if self.scheduler.release(seq.seq_id) is None and not seq.is_finished:
                self.scheduler.abort(seq)
            self._forget(seq)

    # -- decode role ---------------------------------------------------------------------------------

    def reserve_remote(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
    ) -> list[RemoteReservation] | None:
        """Reserve KV blocks for a request prefilled elsewhere. None if the cache is full now."""
        request = self._make_request(request_id, prompt, sampling_params)
        reserved = []
        for seq in request.seqs:
            if not self.scheduler.reserve_for_remote_kv(seq):
                for done in reserved:
                    self.scheduler.abort(done)
                return None
            reserved.append(seq)
        self._register(request)
        return [
            RemoteReservation(s.seq_id, list(s.block_table), s.num_cached_tokens) for s in reserved
        ]

    def admit_remote(self, request_id: str, first_tokens: list[SampledToken]) -> RequestOutput:
        """The prompt KV of every sequence is in place: decode from each first token on."""
        request = self.requests[request_id]
        request.first_token_time_s = time.monotonic()
        for seq, token in zip(request.seqs, first_tokens, strict=True):
            self.scheduler.admit_remote(seq.seq_id)
            self._append_token(request, seq, token)
        output = request.to_output()
        if request.finished:
            self._complete(request)
        return output

    def request_seq_states(self, request_id: str) -> list[tuple[Sequence, SampledToken | None]]:
        """Each sequence of a request with its first sampled token (prefill hand-off)."""
        request = self.requests[request_id]
        result = []
        for seq, state in zip(request.seqs, request.states, strict=True):
            token = None
            if seq.num_output_tokens:
                token = SampledToken(seq.output_token_ids[0])
                if state.logprobs:
                    entry = state.logprobs[0]
                    chosen = entry[token.token_id]
                    token.logprob, token.rank = chosen.logprob, chosen.rank
                    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank)
                    k = seq.sampling_params.logprobs or 0
                    token.top_logprobs = [(tid, lp) for _, tid, lp in top[:k]]
            result.append((seq, token))
        return result
