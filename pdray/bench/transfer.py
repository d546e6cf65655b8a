"""KV transfer benchmark: `cuda_ipc` between two processes on one GPU, or on two GPUs.

    python -m pdray.bench.transfer --output transfer.json

Two GPUs (sender and prefill engine on GPU 0, receiver and decode engine on GPU 1; both processes
see both GPUs, the receiver copies out of the sender's cache with peer access enabled):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python -m pdray.bench.transfer --output transfer_2gpu.json \
        --sender-device cuda:0 --receiver-device cuda:1

bandwidth  A Llama-3-8B-shaped KV cache (32 layers, 8 KV heads, head_dim 128, bf16, 16-token
           blocks) lives in this process (receiver) and in a sender process. Per prompt length
           the sender hands the prompt's written blocks to KVSender -> CudaIpcTransport ->
           KVReceiver (all layers at once, as when a prompt's KV is complete; and, for 8k, layer
           by layer with no compute between layers to hide the per-layer cost), hands off and
           flushes. The decode blocks are contiguous, or, for `--fragmented-lengths`, every other
           block (one block per run: the receiver's one gather/scatter per chunk must not care).
           GB/s = bytes moved / (KV handed to the sender .. flush acknowledged), next to copy
           rates measured in the same run on the same GPU: a plain large torch copy, a plain copy
           of the same size, the same-size copy out of the IPC mapping, and the transfer's own
           copy alone (all layers, K and V, of its blocks: one `kernels.kv_copy` launch out of
           the IPC mapping; for contiguous blocks also torch's strided copy). Every case states
           its ratios to the same-size D2D copy, and fragmented cases their ratio to the
           contiguous case of the same length. With two GPUs the plain copies run on the
           receiver's GPU and the rest cross GPUs; besides, a plain peer copy (`dst.copy_(src)`,
           sender GPU -> receiver GPU, peer access enabled both ways), large and of each
           transfer's size, and every case's ratios to it.
ttft       dummy:llama3-8b prefill and decode engines in two processes (prefill on the sender's
           GPU, decode on the receiver's): an 8k prompt's time to first token at the decode side
           with layer-wise streaming, with the whole transfer after the prefill, and the prefill
           alone (no transfer).

Every byte copied counts once (not read + write), on both sides of every ratio.
"""

from __future__ import annotations

import argparse
import enum
import itertools
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from pdray.bench.timing import device_median_ms
from pdray.bench.transfer_ceilings import (
    copy_alone,
    enable_peer_access,
    on_receiver,
    ratios,
    same_size_ceilings,
)
from pdray.bench.transfer_ttft import cuda_device, ttft
from pdray.kv_transfer.base import Handoff, SeqTicket, Ticket

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
MODEL = "dummy:llama3-8b"


class DecodeBlocks(str, enum.Enum):
    """How the decode side's blocks of a case lie."""

    CONTIGUOUS = "contiguous"
    FRAGMENTED = "fragmented: every other decode block"


def _cache(num_blocks: int, random_fill: bool, device: torch.device | str) -> torch.Tensor:
    shape = (LAYERS, 2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    make = torch.randn if random_fill else torch.zeros
    return make(shape, dtype=torch.bfloat16, device=device)


# -- bandwidth ---------------------------------------------------------------------------------


def _sender_main(conn, num_blocks: int, device: str = "cuda:0") -> None:
    """Sender process on `device`: sends each job's blocks (all layers at once, as when the KV is
    complete, or layer by layer, as a forward streams it, with no compute between layers), hands
    off and flushes."""
    from pdray.engine.scheduler import ScheduledSeq
    from pdray.engine.sequence import Sequence
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport
    from pdray.kv_transfer.sender import KVSender
    from pdray.sampling_params import SamplingParams
    from pdray.worker.batch import SampledToken

    torch.cuda.set_device(device)  # events, synchronize: the current device's
    cache = _cache(num_blocks, random_fill=True, device=device)
    transport = CudaIpcTransport()
    transport.register(cache)
    sender = KVSender(transport, cache)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        if job == "headers":
            conn.send(_headers_only(transport, cache))
            continue
        ticket, src, streamed = Ticket(**job[0]), job[1], job[2]
        num_tokens = len(src) * BLOCK
        seq = Sequence(ticket.seqs[0].seq_id, ticket.request_id, 0, [0] * num_tokens, num_tokens,
                       SamplingParams())  # fmt: skip
        seq.block_table = list(src)
        sender.add_ticket(ticket)
        torch.cuda.synchronize()
        chunks_before = sender.metrics.chunks_sent
        start = time.perf_counter()
        sender.begin_step([ScheduledSeq(seq, num_tokens)])
        if streamed:
            for layer in range(LAYERS):
                sender.on_layer(layer)
        else:
            sender.on_layer(0, LAYERS)
        on_layer_s = time.perf_counter() - start
        sender.end_step()
        sender.hand_off([(seq.seq_id, SampledToken(0), None)], 60.0)
        elapsed = time.perf_counter() - start
        conn.send((start, elapsed, on_layer_s, sender.metrics.chunks_sent - chunks_before))
    transport.close()


def _reply(conn, what: str, timeout_s: float = 120.0):
    """The sender process's next message; RuntimeError if none comes within `timeout_s`."""
    if not conn.poll(timeout_s):
        raise RuntimeError(f"the sender process sent no {what} within {timeout_s:g} s")
    return conn.recv()


def _headers_only(transport, cache, count: int = 1000) -> float:
    """Seconds per LayerChunk header through the transport alone (the receiver ignores them)."""
    from pdray.kv_transfer.base import LayerChunk
    from pdray.kv_transfer.payload import cache_payload

    chunk = LayerChunk(request_id="headers", generation=0, seq_id="headers", layer=0,
                       runs=[(0, 0, 1)])  # fmt: skip
    payload = cache_payload(cache, chunk)
    start = time.perf_counter()
    for _ in range(count):
        transport.send("bench-receiver", chunk, payload)
    transport.flush("bench-receiver", 60.0)
    return (time.perf_counter() - start) / count


def bandwidth(
    lengths: list[int],
    iters: int,
    sender_device: str | torch.device = "cuda:0",
    receiver_device: str | torch.device = "cuda:0",
    fragmented_lengths: tuple[int, ...] = (8192,),
) -> dict:
    """This process receives on `receiver_device`; a spawned process sends from `sender_device`.
    Cases: `lengths` contiguous, 8192 streamed layer by layer, `fragmented_lengths` fragmented."""
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport
    from pdray.kv_transfer.receiver import KVReceiver, TicketState

    sender_device, receiver_device = cuda_device(sender_device), cuda_device(receiver_device)
    two_gpus = sender_device != receiver_device
    torch.cuda.set_device(receiver_device)  # timing events and synchronize: the receiver's GPU
    pad = 64
    num_blocks = max([*lengths, *(2 * n for n in fragmented_lengths), 8192]) // BLOCK + pad
    cache = _cache(num_blocks, random_fill=False, device=receiver_device)
    receiver = KVReceiver(cache)
    apply_s = [0.0]
    marks: dict[str, float] = {}  # perf_counter is system-wide: comparable with the sender's

    def on_message(message, payload) -> None:
        if message.request_id == "headers":
            return
        start = time.perf_counter()
        marks.setdefault("first_message", start)
        receiver.on_message(message, payload)
        end = time.perf_counter()
        apply_s[0] += end - start
        if isinstance(message, Handoff):  # after every chunk: the ticket is complete and
            marks["in_place"] = end  # its copies finished, so the KV is in the decode cache

    transport = CudaIpcTransport()
    descriptor = transport.listen("bench-receiver", cache, on_message)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    sender = ctx.Process(target=_sender_main, args=(child_conn, num_blocks, str(sender_device)),
                         daemon=True)  # fmt: skip
    sender.start()
    if _reply(conn, "start-up", 300.0) != "ready":
        raise RuntimeError("sender process failed to start")
    largest = max([*lengths, *fragmented_lengths, 8192]) * 2 * LAYERS * KV_HEADS * HEAD_DIM * 2
    big_src = torch.empty(largest, dtype=torch.uint8, device=receiver_device).random_()
    big_dst = torch.empty_like(big_src)
    d2d_ms = device_median_ms(lambda: big_dst.copy_(big_src), 10, warmup=1)
    d2d_large_gbps = largest / d2d_ms / 1e6
    report = {"d2d_large_bytes": largest, "d2d_large_gbps": d2d_large_gbps, "cases": []}
    peer_src, peer_large_gbps = None, None
    if two_gpus:  # the events are recorded on the receiver's stream, which waits for the copy
        peer_access = enable_peer_access(receiver_device, sender_device)
        peer_src = torch.empty_like(big_src, device=sender_device).random_()
        peer_ms = device_median_ms(lambda: big_dst.copy_(peer_src), 10, warmup=1)
        peer_large_gbps = largest / peer_ms / 1e6
        report |= {
            "sender_device": str(sender_device),
            "receiver_device": str(receiver_device),
            "peer_access": peer_access,
            "peer_large_gbps": peer_large_gbps,
        }
    generations = itertools.count(1)
    contiguous, fragmented = DecodeBlocks.CONTIGUOUS, DecodeBlocks.FRAGMENTED
    cases = ([(n, contiguous, False) for n in lengths] + [(8192, contiguous, True)]
             + [(n, fragmented, False) for n in fragmented_lengths])  # fmt: skip
    same_size: dict[int, dict] = {}  # tokens -> plain copies of that size
    for num_tokens, blocks, streamed in cases:
        n = num_tokens // BLOCK
        src = list(range(n))
        dst = list(range(pad, pad + 2 * n, 2) if blocks is fragmented else range(pad, pad + n))
        times, applies, on_layer, messages, in_place, first_hop = [], [], [], [], [], []
        sent = "layer by layer" if streamed else "all layers at once"
        for i in range(1 + iters):
            request_id = f"bw-{num_tokens}-{blocks.name[:4]}-{sent[:3]}-{i}"
            ticket = Ticket(
                request_id=request_id, generation=next(generations),
                seqs=[SeqTicket(seq_id=f"{request_id}-0", block_table=dst, num_cached_tokens=0)],
                deadline_s=time.time() + 600.0, receivers=[descriptor],
            )  # fmt: skip
            receiver.expect(ticket)
            apply_s[0] = 0.0
            marks.clear()
            conn.send((ticket.model_dump(), src, streamed))
            started, elapsed, on_layer_s, num_messages = _reply(conn, f"report of {request_id}")
            ((_, state, _, error),) = receiver.poll()
            if state is not TicketState.COMPLETE:
                raise RuntimeError(f"transfer of {request_id} ended {state.value}: {error}")
            if i:  # the first one warms up (and connects)
                times.append(elapsed)
                applies.append(apply_s[0])
                on_layer.append(on_layer_s)
                messages.append(num_messages)
                in_place.append(marks["in_place"] - started)
                first_hop.append(marks["first_message"] - started)
        mapped = transport.mapped_caches()[0]
        # src is blocks 0..n-1
        sender_kv = on_receiver(mapped, n, cache.device) if two_gpus else mapped[:, :, src]
        num_bytes = 2 * LAYERS * n * BLOCK * KV_HEADS * HEAD_DIM * 2
        case = {
            "tokens": num_tokens,
            "layout": blocks.value,
            "sent": sent,
            "runs_per_layer": n if blocks is fragmented else 1,
            "bytes": num_bytes,
            "exact": bool(torch.equal(cache[:, :, dst], sender_kv)),
            "transfer_ms": [t * 1e3 for t in times],
            "transfer_gbps": num_bytes / statistics.median(times) / 1e9,
            "in_place_ms": [t * 1e3 for t in in_place],
            "in_place_gbps": num_bytes / statistics.median(in_place) / 1e9,
            "first_message_after_ms": statistics.median(first_hop) * 1e3,
            "receiver_apply_gbps": num_bytes / statistics.median(applies) / 1e9,
            "receiver_apply_ms": statistics.median(applies) * 1e3,
            "sender_on_layer_ms": statistics.median(on_layer) * 1e3,
            "chunk_messages": messages,
        }
        if num_tokens not in same_size:
            buffers = (big_src, big_dst)
            same_size[num_tokens] = same_size_ceilings(cache, mapped, buffers, num_bytes, peer_src)
        case |= same_size[num_tokens]
        if not streamed:
            case |= copy_alone(cache, mapped, src, dst, num_bytes)
        case |= ratios(case, d2d_large_gbps, peer_large_gbps)
        like = [c for c in report["cases"] if (c["tokens"], c["sent"]) == (num_tokens, sent)]
        if blocks is fragmented and like:  # the contiguous case of the same length and sending
            case["in_place_vs_contiguous"] = case["in_place_gbps"] / like[0]["in_place_gbps"]
            case["transfer_vs_contiguous"] = case["transfer_gbps"] / like[0]["transfer_gbps"]
        report["cases"].append(case)
        print(json.dumps(case), flush=True)
    conn.send("headers")
    report["transport_us_per_header"] = _reply(conn, "header timing") * 1e6
    conn.send(None)
    sender.join(timeout=30)
    transport.close()
    return report


# -- time to first token -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="path of the JSON report")
    parser.add_argument("--lengths", default="1024,8192,32768", help="prompt lengths (tokens)")
    parser.add_argument(
        "--fragmented-lengths",
        default="8192",
        help="prompt lengths also sent into every other decode block ('' for none)",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed transfers per length")
    parser.add_argument("--ttft-tokens", type=int, default=8192)
    parser.add_argument("--ttft-rounds", type=int, default=3)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-bandwidth", action="store_true", help="the TTFT part alone")
    parser.add_argument(
        "--sender-device",
        type=cuda_device,
        default="cuda:0",
        help="GPU of the sender process and of the TTFT prefill engine",
    )
    parser.add_argument(
        "--receiver-device",
        type=cuda_device,
        default="cuda:0",
        help="GPU of this (receiving) process and of the TTFT decode engine",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import cupy

    sender_device, receiver_device = args.sender_device, args.receiver_device
    torch.cuda.set_device(receiver_device)
    output = Path(args.output)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "kv_shape": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK,
            "dtype": "bfloat16",
        },
    }
    if sender_device != receiver_device:
        report["devices"] = {
            "sender": f"{sender_device} ({torch.cuda.get_device_name(sender_device)})",
            "receiver": f"{receiver_device} ({torch.cuda.get_device_name(receiver_device)})",
        }
    lengths = [int(n) for n in args.lengths.split(",")]
    fragmented = tuple(int(n) for n in args.fragmented_lengths.split(",") if n)
    if not args.skip_bandwidth:
        report["bandwidth"] = bandwidth(
            lengths, args.iters, sender_device, receiver_device, fragmented_lengths=fragmented
        )
        output.write_text(json.dumps(report, indent=2))
    torch.cuda.empty_cache()
    if not args.skip_ttft:
        report["ttft"] = ttft(args.ttft_tokens, args.ttft_rounds, sender_device, receiver_device)
        output.write_text(json.dumps(report, indent=2))
    bw = report.get("bandwidth", {"cases": []})
    if bw["cases"]:
        print(f"plain D2D copy ({bw['d2d_large_bytes'] / 1e9:.1f} GB): {bw['d2d_large_gbps']:.0f} GB/s; "
              f"transport {bw['transport_us_per_header']:.1f} us per header")  # fmt: skip
    if "peer_large_gbps" in bw:
        print(f"plain peer copy {bw['sender_device']} -> {bw['receiver_device']}: "
              f"{bw['peer_large_gbps']:.0f} GB/s (peer access: {bw['peer_access']})")  # fmt: skip
    for c in bw["cases"]:
        vs = f"x{c['in_place_vs_d2d_same_size']:.3f} of same-size D2D"
        if "in_place_vs_peer_same_size" in c:
            vs += f", x{c['in_place_vs_peer_same_size']:.3f} of same-size peer"
        if "in_place_vs_contiguous" in c:
            vs += f", x{c['in_place_vs_contiguous']:.3f} of contiguous"
        print(f"{c['tokens']:>6} tokens {c['layout'][:10]:<10} {c['sent']:<18} "
              f"in place {c['in_place_gbps']:7.1f} GB/s ({vs}; 1st msg "
              f"+{c['first_message_after_ms']:.2f} ms) acked {c['transfer_gbps']:7.1f} GB/s "
              f"(x{c['ratio_vs_d2d_same_size']:.3f} of same-size D2D) apply "
              f"{c['receiver_apply_gbps']:.0f} GB/s  exact={c['exact']}")  # fmt: skip
    if "ttft" in report:
        t = report["ttft"]
        print(f"{t['prompt_tokens']} tokens ({t['attention_backend']}), submit to decode's "
              "admission (KV in place; prefill_only: to its hand-off): "
              + ", ".join(f"{m} {v:.1f} ms" for m, v in t["ttft_ms"].items())
              + f"; stream/prefill_only {t['vs_prefill_only']['stream']:.3f}")  # fmt: skip
        print(
            "  prefill's first token (the client's first token): "
            + ", ".join(f"{m} {v:.1f} ms" for m, v in t["prefill_first_token_ms"].items())
        )
        for mode, timeline in t["timeline_median_ms"].items():
            print(f"  {mode:<12} " + " ".join(f"{k}={v:.1f}" for k, v in timeline.items()))


if __name__ == "__main__":
    main()
