"""Offline generation with pdray's vLLM-style API.

python examples/offline_inference.py                       # random-weight demo model
python examples/offline_inference.py --model /path/to/hf   # a real local checkpoint
python examples/offline_inference.py --quantization wint4  # int4 linear layers
"""

from __future__ import annotations

import argparse

from pdray import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="dummy:tiny", help="HF directory or dummy:<preset>")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantization", choices=["wint4"], default=None)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    prompts = [
        "The capital of France is",
        "Write a haiku about GPUs:",
        "def fibonacci(n):",
        "Prefill and decode are different because",
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for out in llm.generate(prompts, greedy):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")

    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=42, n=2, max_tokens=args.max_tokens)
    reply = llm.chat([{"role": "user", "content": "Say hello in three languages."}], sampled)[0]
    for completion in reply.outputs:
        print(f"chat #{completion.index}: {completion.text!r}")
    if args.model.startswith("dummy:"):
        print("(random weights: the text is noise; pass --model <dir> for a real checkpoint)")


if __name__ == "__main__":
    main()
