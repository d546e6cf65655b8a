"""Quality of wint4 against the unquantized engine, teacher-forced on the latter's own outputs.

    python -m pdray.bench.quality --model dummy:tiny --device cpu --out quality.json

1. The unquantized engine generates greedy continuations of random token-id prompts.
2. Each engine (the unquantized one, then each int4 scheme) scores those same sequences
   teacher-forced: `SamplingParams(prompt_logprobs=1, max_tokens=1)` gives, at every generated
   position, the reference token's log-probability and rank and the engine's own top-1.
3. Per scheme: top-1 agreement (the scheme's top-1 equals the unquantized engine's at a generated
   position), the mean and max |logprob difference| of the reference tokens, and their mean
   logprob (the unquantized engine's own line is the sanity check: its teacher-forced top-1
   equals its greedy token).

Schemes are round-to-nearest int4 per group: `asymmetric` (zero and scale from the group's min
and max: what `quantization="wint4"` does, measured through the engine as users run it) and
`symmetric` (zero 8, scale max|w| / 7; not an engine option: measured by quantizing an eager
unquantized engine's linear layers in place, one rank), and `asymmetric+lm_head` (wint4 with the
engine argument `quantize_lm_head`: the LM head in int4 too). docs/quantization.md has the
figures.
"""

from __future__ import annotations

import argparse
import enum
import json
import random
from dataclasses import asdict, dataclass

from pdray.config import Quantization
from pdray.entrypoints.llm import LLM
from pdray.layers.linear import quantize_linear_layers
from pdray.quantization.spec import Int4Source, Int4Spec
from pdray.sampling_params import SamplingParams


class Scheme(str, enum.Enum):
    """Round-to-nearest int4 per group."""

    ASYMMETRIC = "asymmetric"  # what quantization="wint4" runs (Int4Spec's default)
    SYMMETRIC = "symmetric"  # measured by quantizing an unquantized engine's layers in place
    ASYMMETRIC_LM_HEAD = "asymmetric+lm_head"  # wint4 with quantize_lm_head=True

    def __str__(self) -> str:  # as argparse shows the choices
        return self.value


@dataclass(frozen=True, slots=True)
class PositionScore:
    """One generated position, teacher-forced: the engine's top-1 token, and the logprob and
    rank (1 = top) of the reference engine's greedy token there."""

    top1: int
    logprob: float
    rank: int


@dataclass(frozen=True, slots=True)
class QualityFigures:
    scheme: str
    positions: int
    top1_agreement: float  # top-1 equals the unquantized engine's top-1
    greedy_token_top1: float  # the unquantized greedy token is this engine's top-1
    mean_abs_logprob_diff: float  # of the unquantized greedy tokens, against the unquantized
    max_abs_logprob_diff: float
    mean_logprob: float  # of the unquantized greedy tokens


def make_prompts(vocab_size: int, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Random token ids (ids below 3 are left out: special tokens of the test tokenizers)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]


def greedy_continuations(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def score(llm: LLM, prompts: list[list[int]], continuations: list[list[int]]):
    """Per sequence, the `PositionScore` of each continuation token, teacher-forced."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    outputs = llm.generate(sequences, params, use_tqdm=False)
    scores = []
    for prompt, sequence, out in zip(prompts, sequences, outputs, strict=True):
        rows = []
        for position in range(len(prompt), len(sequence)):
            entries = out.prompt_logprobs[position]
            token = sequence[position]
            top1 = next(t for t, lp in entries.items() if lp.rank == 1)
            rows.append(PositionScore(top1, entries[token].logprob, entries[token].rank))
        scores.append(rows)
    return scores


def compare(scheme: str, reference: list, scores: list) -> QualityFigures:
    pairs = [
        (r, s) for ref_rows, rows in zip(reference, scores, strict=True)
        for r, s in zip(ref_rows, rows, strict=True)
    ]  # fmt: skip
    diffs = [abs(s.logprob - r.logprob) for r, s in pairs]
    n = len(pairs)
    return QualityFigures(
        scheme=scheme,
        positions=n,
        top1_agreement=sum(s.top1 == r.top1 for r, s in pairs) / n,
        greedy_token_top1=sum(s.rank == 1 for _, s in pairs) / n,
        mean_abs_logprob_diff=sum(diffs) / n,
        max_abs_logprob_diff=max(diffs),
        mean_logprob=sum(s.logprob for _, s in pairs) / n,
    )


def _engine(args, scheme: Scheme | None) -> LLM:
    """The unquantized engine (None), or one running `scheme`."""
    kwargs = {
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "num_kv_blocks": args.num_kv_blocks,
    }
    if scheme in (Scheme.ASYMMETRIC, Scheme.ASYMMETRIC_LM_HEAD):
        head = scheme is Scheme.ASYMMETRIC_LM_HEAD
        return LLM(args.model, quantization=Quantization.WINT4, quantize_lm_head=head, **kwargs)
    llm = LLM(args.model, enforce_eager=scheme is not None, **kwargs)
    if scheme is Scheme.SYMMETRIC:  # one rank, eager: no CUDA graph holds the old weights
        spec = Int4Spec(Int4Source.RTN, symmetric=True)
        quantize_linear_layers(llm.engine.runner.model, spec)
    return llm


def run(args) -> dict:
    reference_llm = _engine(args, None)
    try:
        vocab = reference_llm.engine.runner.arch.vocab_size
        prompts = make_prompts(vocab, args.num_prompts, args.prompt_len, args.seed)
        continuations = greedy_continuations(reference_llm, prompts, args.max_tokens)
        reference = score(reference_llm, prompts, continuations)
    finally:
        reference_llm.close()
    figures = [compare("unquantized", reference, reference)]
    for scheme in args.schemes:
        llm = _engine(args, scheme)
        try:
            scores = score(llm, prompts, continuations)
            figures.append(compare(scheme.value, reference, scores))
        finally:
            llm.close()
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "figures": [asdict(f) for f in figures],
    }


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']} ({result['device']}, {result['dtype']}): {result['num_prompts']} "
        f"prompts x {result['prompt_len']} tokens, {result['max_tokens']} greedy tokens each",
        f"{'scheme':<12} {'top-1 agree':>11} {'greedy=top1':>11} {'mean|dlp|':>10} "
        f"{'max|dlp|':>9} {'mean lp':>8}",
    ]
    for f in result["figures"]:
        lines.append(
            f"{f['scheme']:<12} {f['top1_agreement']:>11.4f} {f['greedy_token_top1']:>11.4f} "
            f"{f['mean_abs_logprob_diff']:>10.4f} {f['max_abs_logprob_diff']:>9.4f} "
            f"{f['mean_logprob']:>8.4f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dummy:tiny", help="HF directory or dummy:<preset>")
    parser.add_argument(
        "--quantization",
        default=Quantization.WINT4.value,
        choices=[q.value for q in Quantization],
        help="the quantization measured (its schemes: --schemes)",
    )
    parser.add_argument(
        "--schemes",
        nargs="+",
        type=Scheme,
        default=list(Scheme),
        choices=list(Scheme),
        help="int4 schemes compared with the unquantized engine",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV blocks per engine (default: sized)"
    )
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_kv_blocks is None:  # every sequence at once, in 16-token blocks, twice over
        per_seq = -(-(args.prompt_len + args.max_tokens + 1) // 16)
        args.num_kv_blocks = 2 * args.num_prompts * per_seq
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
