from __future__ import annotations

import math

import pytest
import torch

from pdray.worker.batch import SamplingRow
from pdray.worker.sampler import Sampler

# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def _chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum(
        (count - total * p) ** 2 / (total * p) for count, p in zip(counts, probs, strict=True)
    )


def _counts(tokens: list[int], vocab_size: int) -> list[int]:
    return [tokens.count(token_id) for token_id in range(vocab_size)]


def _sample_many(sampler: Sampler, logits: list[float], row: SamplingRow, n: int) -> list[int]:
    batch = torch.tensor([logits] * n)
    return [sampled.token_id for sampled in sampler(batch, [row] * n)]


def test_empty_batch() -> None:
    assert Sampler()(torch.empty(0, 10), []) == []


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 50, dtype=torch.bfloat16)
    rows = [SamplingRow(seq_id=str(i), temperature=0.0) for i in range(8)]
    tokens = [sampled.token_id for sampled in Sampler()(logits, rows)]
    assert tokens == logits.float().argmax(dim=-1).tolist()
    assert all(sampled.logprob is None for sampled in Sampler()(logits, rows))


def test_input_logits_are_not_modified() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    before = logits.clone()
    row = SamplingRow(seq_id="a", banned_token_ids=[1], repetition_penalty=2.0)
    row.prompt_token_ids, row.output_token_ids = [0], [2]
    Sampler()(logits, [row])
    assert torch.equal(logits, before)


def test_banned_tokens_never_sampled() -> None:
    torch.manual_seed(0)
    logits = [10.0, 9.0, 0.0, 0.0, 1.0]
    sampler = Sampler()
    random_row = SamplingRow(seq_id="r", temperature=1.0, banned_token_ids=[0, 1, 99, -3])
    tokens = _sample_many(sampler, logits, random_row, 2000)
    assert set(tokens) == {2, 3, 4}
    greedy_row = SamplingRow(seq_id="g", temperature=0.0, banned_token_ids=[0, 1])
    assert _sample_many(sampler, logits, greedy_row, 1) == [4]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    torch.manual_seed(1)
    sampler = Sampler()
    for _ in range(20):
        logits = torch.randn(6, 100)
        expected = logits.argmax(dim=-1).tolist()
        top_k_rows = [SamplingRow(seq_id=f"k{i}", temperature=1.5, top_k=1) for i in range(6)]
        top_p_rows = [SamplingRow(seq_id=f"p{i}", temperature=1.5, top_p=1e-6) for i in range(6)]
        assert [s.token_id for s in sampler(logits, top_k_rows)] == expected
        assert [s.token_id for s in sampler(logits, top_p_rows)] == expected


def test_min_p_drops_unlikely_tokens() -> None:
    torch.manual_seed(2)
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    row = SamplingRow(seq_id="m", min_p=0.2)
    counts = _counts(_sample_many(Sampler(), logits, row, 6000), 4)
    assert counts[3] == 0
    kept = [p / 0.95 for p in probs[:3]]
    assert _chi_square(counts[:3], kept) < CHI2_CRITICAL[2]


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    torch.manual_seed(3)
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    sampler = Sampler()
    top_k_counts = _counts(_sample_many(sampler, logits, SamplingRow("k", top_k=3), 6000), 4)
    assert top_k_counts[3] == 0
    assert _chi_square(top_k_counts[:3], [p / 0.95 for p in probs[:3]]) < CHI2_CRITICAL[2]
    top_p_counts = _counts(_sample_many(sampler, logits, SamplingRow("p", top_p=0.7), 6000), 4)
    assert top_p_counts[2] == top_p_counts[3] == 0
    assert _chi_square(top_p_counts[:2], [0.625, 0.375]) < CHI2_CRITICAL[1]
    both = _sample_many(sampler, logits, SamplingRow("b", top_k=3, top_p=0.85), 3000)
    assert set(both) == {0, 1, 2}


def test_penalties_match_hand_computed_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.9], [2.0, -1.0, 0.5, 3.0, -2.0, 0.9]])
    penalized = SamplingRow(
        seq_id="a",
        temperature=0.0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        prompt_token_ids=[0, 1],
        output_token_ids=[3, 3, 2],
    )
    plain = SamplingRow(seq_id="b", temperature=0.0)
    sampler = Sampler()
    processed = logits.clone()
    sampler._apply_penalties(processed, [penalized, plain])
    expected = torch.tensor([1.0, -2.0, -0.5, 0.5, -2.0, 0.9])
    torch.testing.assert_close(processed[0], expected)
    torch.testing.assert_close(processed[1], logits[1])
    assert [s.token_id for s in sampler(logits, [penalized, plain])] == [0, 3]


def test_presence_and_frequency_only_count_output_tokens() -> None:
    logits = torch.zeros(1, 4)
    row = SamplingRow(
        seq_id="a",
        presence_penalty=1.0,
        frequency_penalty=-0.5,
        prompt_token_ids=[0, 0, 0],
        output_token_ids=[1, 1, 1, 2],
    )
    Sampler()._apply_penalties(logits, [row])
    torch.testing.assert_close(logits[0], torch.tensor([0.0, 0.5, -0.5, 0.0]))


def _seeded_tokens(
    steps: list[torch.Tensor], position: int, batch_size: int, seed: int
) -> list[int]:
    sampler = Sampler()
    tokens: list[int] = []
    for step, row_logits in enumerate(steps):
        torch.manual_seed(1000 + step)
        logits = torch.randn(batch_size, row_logits.shape[0])
        logits[position] = row_logits
        rows = [SamplingRow(seq_id=f"other{i}", temperature=1.0) for i in range(batch_size)]
        rows[position] = SamplingRow(seq_id="s", temperature=0.9, top_p=0.95, seed=seed)
        if batch_size > 2:
            rows[(position + 1) % batch_size].seed = 7
        tokens.append(sampler(logits, rows)[position].token_id)
    return tokens


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(5)
    steps = [torch.randn(64, generator=generator) * 0.5 for _ in range(60)]
    alone = _seeded_tokens(steps, position=0, batch_size=1, seed=1234)
    assert _seeded_tokens(steps, position=3, batch_size=5, seed=1234) == alone
    assert _seeded_tokens(steps, position=1, batch_size=2, seed=1234) == alone
    assert _seeded_tokens(steps, position=0, batch_size=1, seed=4321) != alone
    assert len(set(alone)) > 10


def test_seeded_stream_continues_and_free_restarts_it() -> None:
    logits = torch.zeros(1, 1000)
    row = SamplingRow(seq_id="s", seed=42)
    sampler = Sampler()
    first = [sampler(logits, [row])[0].token_id for _ in range(5)]
    assert len(set(first)) > 1
    sampler.free(["s", "never-seen"])
    assert [sampler(logits, [row])[0].token_id for _ in range(5)] == first


def test_sampled_distribution_matches_softmax() -> None:
    torch.manual_seed(4)
    logits = [1.0, 0.5, 0.0, -0.5, -1.0]
    probs = torch.softmax(torch.tensor(logits) / 2.0, dim=-1).tolist()
    row = SamplingRow(seq_id="d", temperature=2.0)
    counts = _counts(_sample_many(Sampler(), logits, row, 20000), 5)
    assert _chi_square(counts, probs) < CHI2_CRITICAL[4]
    assert _chi_square(counts, torch.softmax(torch.tensor(logits), -1).tolist()) > 50


def test_seeded_rows_follow_the_distribution() -> None:
    logits = [1.0, 0.5, 0.0, -0.5, -1.0]
    probs = torch.softmax(torch.tensor(logits), dim=-1).tolist()
    rows = [SamplingRow(seq_id=str(i), seed=i) for i in range(8000)]
    tokens = [s.token_id for s in Sampler()(torch.tensor([logits] * 8000), rows)]
    assert _chi_square(_counts(tokens, 5), probs) < CHI2_CRITICAL[4]


def test_logprobs_come_from_the_raw_distribution() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, -2.0], [0.2, 0.1, 0.0, 2.0, 1.0]])
    rows = [
        SamplingRow(
            seq_id="a",
            temperature=0.0,
            num_logprobs=3,
            banned_token_ids=[1, 2],
            repetition_penalty=3.0,
            prompt_token_ids=[4],
        ),
        SamplingRow(seq_id="b", temperature=0.5, num_logprobs=0, top_k=1),
    ]
    results = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert results[0].token_id == 0
    assert results[0].logprob == pytest.approx(raw[0, 0].item())
    assert results[0].rank == 3
    top_ids = [token_id for token_id, _ in results[0].top_logprobs]
    assert top_ids in ([1, 2, 0], [2, 1, 0])
    for token_id, logprob in results[0].top_logprobs:
        assert logprob == pytest.approx(raw[0, token_id].item())
    assert results[1].token_id == 3
    assert results[1].rank == 1
    assert results[1].logprob == pytest.approx(raw[1, 3].item())
    assert results[1].top_logprobs == []


def test_rank_counts_strictly_better_tokens() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    row = SamplingRow(seq_id="a", temperature=0.0, num_logprobs=5, banned_token_ids=[0, 1, 2, 4])
    result = Sampler()(logits, [row])[0]
    assert (result.token_id, result.rank) == (3, 5)
    assert [logprob for _, logprob in result.top_logprobs] == sorted(
        torch.log_softmax(logits[0], -1).tolist(), reverse=True
    )
    tie = Sampler()(logits, [SamplingRow(seq_id="b", temperature=0.0, num_logprobs=1)])[0]
    assert (tie.token_id, tie.rank) == (1, 1)
    assert tie.top_logprobs[0][1] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


# -- the greedy fast path ----------------------------------------------------------------------


def _tied_logits(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[16, 50] logits on a coarse grid, so most rows hold ties for the maximum."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 8, (16, 50), generator=generator) / 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_fast_path_picks_the_general_samplers_tokens(dtype, monkeypatch) -> None:
    sampler = Sampler()
    for seed in range(5):
        logits = _tied_logits(dtype, seed)
        greedy = [SamplingRow(f"g{i}", temperature=0.0) for i in range(16)]
        # asking for logprobs takes the general path (float copy, per-row greedy argmax)
        general = [SamplingRow(f"g{i}", temperature=0.0, num_logprobs=0) for i in range(16)]
        expected = [s.token_id for s in sampler(logits, general)]
        with monkeypatch.context() as patch:
            patch.setattr(sampler, "_sample", lambda *a: pytest.fail("took the general path"))
            fast = [s.token_id for s in sampler(logits, greedy)]
            given = [s.token_id for s in sampler(logits, greedy, argmax=logits.argmax(dim=-1))]
        assert fast == given == expected


def test_fast_path_returns_the_argmax_it_is_given() -> None:
    logits = torch.zeros(3, 8)
    rows = [SamplingRow(f"g{i}", temperature=0.0) for i in range(3)]
    given = torch.tensor([5, 0, 7])
    assert [s.token_id for s in Sampler()(logits, rows, argmax=given)] == [5, 0, 7]


@pytest.mark.parametrize(
    "row",
    [
        SamplingRow("b", temperature=0.0, banned_token_ids=[3]),
        SamplingRow("r", temperature=0.0, repetition_penalty=2.0, output_token_ids=[3]),
        SamplingRow("p", temperature=0.0, presence_penalty=5.0, output_token_ids=[3]),
    ],
    ids=["banned", "repetition", "presence"],
)
def test_greedy_rows_that_change_the_logits_skip_the_fast_path(row) -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    plain = SamplingRow("g", temperature=0.0)
    # argmax says 3 for both rows; the banned or penalized row must not take it
    tokens = [s.token_id for s in Sampler()(logits, [row, plain], argmax=torch.tensor([3, 3]))]
    assert tokens == [2, 3]


def test_greedy_engine_tokens_equal_the_general_paths(checkpoint) -> None:
    from pdray import LLM, SamplingParams

    prompts = [[5, 9, 200, 31], [17] * 11, [3, 4]]
    fast = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    general = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    with LLM(str(checkpoint("llama3")), device="cpu", dtype="float32", block_size=4) as llm:
        outputs = [llm.generate(prompts, p, use_tqdm=False) for p in (fast, general)]
    tokens = [[o.outputs[0].token_ids for o in out] for out in outputs]
    assert tokens[0] == tokens[1]
