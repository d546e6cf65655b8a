"""Offline disaggregated inference: a prefill engine and a decode engine, KV moved between them.

    python examples/offline_disaggregated.py --transport local      # both engines in one process
    python examples/offline_disaggregated.py --transport ucx        # two processes, UCX (TCP on CPU)
    python examples/offline_disaggregated.py --transport cuda_ipc   # two processes on one GPU
    python examples/offline_disaggregated.py --transport ucx --device cpu --prefill-tp 2
                                                # prefill over 2 tensor-parallel ranks, decode 1
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python examples/offline_disaggregated.py --transport cuda_ipc \
        --prefill-device cuda:0 --decode-device cuda:1
                                                # prefill on GPU 0, decode on GPU 1 (peer access)

Prints each output and checks it against a mixed (non-disaggregated) engine under greedy decoding.
"""

from __future__ import annotations

import argparse

from pdray import LLM, SamplingParams
from pdray.disagg.pair import DisaggregatedLLM, LocalDisaggregatedLLM


def side_args(args: argparse.Namespace) -> dict:
    """`prefill_args` / `decode_args` for DisaggregatedLLM: what one side changes of the engine
    arguments both share (its device, its tensor_parallel_size); empty if neither changes any."""
    sides = {}
    for side in ("prefill", "decode"):
        own = {}
        device = getattr(args, f"{side}_device")
        if device is not None and device != args.device:
            own["device"] = device
        if args.prefill_tp > 1 or args.decode_tp > 1:
            own["tensor_parallel_size"] = getattr(args, f"{side}_tp")
        sides[f"{side}_args"] = own
    return sides if any(sides.values()) else {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="dummy:tiny", help="HF directory or dummy:<preset>")
    parser.add_argument("--transport", default="local", choices=["local", "ucx", "cuda_ipc"])
    parser.add_argument("--device", default="auto", help="both engines' device, and the mixed's")
    parser.add_argument("--prefill-device", help="prefill engine's device (default: --device)")
    parser.add_argument("--decode-device", help="decode engine's device (default: --device)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--prefill-tp", type=int, default=1, help="prefill tensor_parallel_size")
    parser.add_argument("--decode-tp", type=int, default=1, help="decode tensor_parallel_size")
    args = parser.parse_args(argv)
    if side_args(args) and args.transport == "local":
        parser.error("per-side devices or tensor parallelism need --transport ucx or cuda_ipc")
    return args


def main() -> None:
    args = parse_args()
    engine_args = {"device": args.device, "gpu_memory_utilization": args.gpu_memory_utilization}
    if args.device == "cpu" or args.transport != "cuda_ipc":
        engine_args["num_kv_blocks"] = 2048
    prompts = [
        "The capital of France is",
        "Disaggregated serving splits prefill and decode because " * 3,
        "def quicksort(xs):",
        "A" * 200,
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    pair_class = LocalDisaggregatedLLM if args.transport == "local" else DisaggregatedLLM
    kwargs = {} if args.transport == "local" else {"transport": args.transport, **side_args(args)}
    with pair_class(args.model, **kwargs, **engine_args) as pair:
        outputs = pair.generate(prompts, params)
    reference = LLM(args.model, **engine_args).generate(prompts, params, use_tqdm=False)
    for out, ref in zip(outputs, reference, strict=True):
        same = out.outputs[0].token_ids == ref.outputs[0].token_ids
        print(
            f"{out.prompt[:40]!r} -> {out.outputs[0].text!r}  [{'= mixed' if same else 'DIFFERS'}]"
        )
    if any(
        o.outputs[0].token_ids != r.outputs[0].token_ids
        for o, r in zip(outputs, reference, strict=True)
    ):
        raise SystemExit("disaggregated output differs from the mixed engine")


if __name__ == "__main__":
    main()
