"""The TTFT part of the KV transfer benchmark (`python -m pdray.bench.transfer`): dummy:llama3-8b
prefill and decode engines in two processes (prefill on the sender's GPU, decode on the
receiver's); an 8k prompt's time to first token at the decode side with layer-wise streaming,
with the whole transfer after the prefill, and the prefill alone (no transfer).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import time

import torch

from pdray.kv_transfer.base import Ticket

MODEL = "dummy:llama3-8b"
BLOCK = 16
REPLY_TIMEOUT_S = 300.0  # an engine process's start (CUDA graphs) is the longest wait
STEP_TIMEOUT_S = 60.0  # an output of a request already running


def cuda_device(name: str | torch.device) -> torch.device:
    """`name` as a CUDA device with its index ("cuda" is cuda:0, the device of a fresh process)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a device: {name!r}") from e
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"cuda_ipc needs CUDA devices, got {name!r}")
    return torch.device("cuda", device.index or 0)


class _AfterForward:
    """Step observer that sends every layer's KV only once the whole forward is done."""

    def __init__(self, sender, num_layers: int):
        self.sender, self.num_layers, self.scheduled = sender, num_layers, []

    def begin_step(self, scheduled) -> None:
        self.scheduled = scheduled

    def end_step(self) -> None:
        self.sender.begin_step(self.scheduled)
        for layer in range(self.num_layers):
            self.sender.on_layer(layer)
        self.sender.end_step()


# mode -> (how prefill sends the KV, decode loop spins while awaiting KV, GIL switch interval s)
MODES = {
    "prefill_only": ("none", False, 0.005),
    "stream": ("stream", False, 0.005),
    "after": ("after", False, 0.005),
    "stream_spin": ("stream", True, 0.005),
    "stream_si": ("stream", False, 0.0001),
    "after_si": ("after", False, 0.0001),
}


def _wait_s(worker, spin: bool) -> float:
    """How long the engine loop blocks for commands. A decode engine that only awaits KV spins
    (like a plain loop would) or blocks briefly, leaving the GIL to the transport thread."""
    if not worker.has_work():
        return 0.005
    awaiting_kv_only = hasattr(worker, "pending") and not worker.engine.scheduler.has_work
    return 0.0005 if awaiting_kv_only and not spin else 0.0


def _traced_transport():
    """A CudaIpcTransport that records when each message is sent, and applied (start, end)."""
    from pdray.kv_transfer.cuda_ipc import CudaIpcTransport

    class Traced(CudaIpcTransport):
        def __init__(self) -> None:
            super().__init__()
            self.trace: list[tuple] = []

        def listen(self, engine_id, kv_cache, on_message, layout=None):
            def timed(message, payload) -> None:
                start = time.monotonic()
                on_message(message, payload)
                self.trace.append((type(message).__name__, start, time.monotonic()))

            return super().listen(engine_id, kv_cache, timed, layout)

        def send(self, peer_id, message, payload=None) -> None:
            self.trace.append((type(message).__name__, time.monotonic()))
            super().send(peer_id, message, payload)

    return Traced()


def _engine_main(role: str, engine_args: dict, conn) -> None:
    """Engine process: answers reserve/submit/trace, reports times on its monotonic clock."""
    from pdray.config import EngineConfig
    from pdray.disagg.decode import DecodeWorker
    from pdray.disagg.prefill import PrefillWorker
    from pdray.engine.llm_engine import LLMEngine
    from pdray.engine.role_worker import PrefillResult, RequestFailed

    # The engine does not select its GPU: CUDA graphs, the sender's events and Triton launches
    # use the current device, which a spawned process has as cuda:0.
    torch.cuda.set_device(engine_args["device"])
    engine = LLMEngine(EngineConfig(model=MODEL, role=role, **engine_args))
    transport = _traced_transport()
    if role == "prefill":
        worker = PrefillWorker(engine, transport)
        after = _AfterForward(worker.sender, len(engine.runner.attention_layers))
    else:
        worker = DecodeWorker(engine, transport, engine_id="bench-decode", lease_s=600.0)
    conn.send(("ready", getattr(worker, "descriptor", None), engine.runner.backend.name))

    def report(request_id: str, out) -> None:
        now = time.monotonic()
        if isinstance(out, RequestFailed):
            conn.send(("failed", now, str(out.error)))
        elif isinstance(out, PrefillResult):  # KV handed off (or why not)
            conn.send(("prefilled", now, out.error))
        elif role == "prefill":  # the first token, streamed before the hand-off
            conn.send(("first_token", now, out.outputs[0].token_ids))
        else:  # decode: the admission (the KV is in place), then each step's output
            conn.send(("output", now, out.finished))

    spin = False
    while True:
        while conn.poll(_wait_s(worker, spin)):
            command, args = conn.recv()
            if command == "close":
                return
            if command == "trace":
                conn.send(("trace", transport.trace[:]))
                transport.trace.clear()
                continue
            *args, mode = args
            send, spin, switch_interval_s = MODES[mode]
            sys.setswitchinterval(switch_interval_s)
            if command == "reserve":
                conn.send(("ticket", worker.reserve(*args).model_dump()))
                continue
            request_id, prompt, params, ticket = args
            stream = send == "stream"
            engine.runner.on_layer_kv_written = worker.sender.on_layer if stream else None
            engine.step_observer = after if send == "after" else worker.sender
            conn.send(("submitted", time.monotonic()))
            worker.submit(request_id, prompt, params, ticket and Ticket(**ticket))
        if worker.has_work():
            worker.step(report)  # each output as it is emitted, as the engine loop streams it


def _expect(conn, kind: str | tuple[str, ...], timeout_s: float = REPLY_TIMEOUT_S) -> tuple:
    """The next message of an engine process, which must be of `kind` (or one of them);
    RuntimeError if another comes, or none within `timeout_s` (the process died, or hangs)."""
    if not conn.poll(timeout_s):
        raise RuntimeError(f"an engine process sent no {kind!r} within {timeout_s:g} s")
    message = conn.recv()
    if message[0] not in ((kind,) if isinstance(kind, str) else kind):
        raise RuntimeError(f"expected {kind!r}, got {message!r}")
    return message


def _timeline(submitted: float, first: float, sends: list, applies: list) -> dict:
    """Where one request's time to first token went (ms from submit), from the two traces."""
    chunk_sends = [t for kind, t in sends if kind == "LayerChunk"]
    chunk_applies = [(start, end) for kind, start, end in applies if kind == "LayerChunk"]
    if not chunk_sends:
        return {}
    return {
        "first_send": (chunk_sends[0] - submitted) * 1e3,
        "last_send": (chunk_sends[-1] - submitted) * 1e3,
        "last_apply_end": (chunk_applies[-1][1] - submitted) * 1e3,
        "first_token": (first - submitted) * 1e3,
        "apply_busy": sum(end - start for start, end in chunk_applies) * 1e3,
        "max_send_to_apply": max(
            a - s for s, (a, _) in zip(chunk_sends, chunk_applies, strict=True)
        )
        * 1e3,
    }


def engine_args_by_role(num_tokens: int, prefill_device, decode_device) -> dict[str, dict]:
    """The TTFT engines' arguments: the same but for the device (prefill: the sender's GPU)."""
    prefill_device, decode_device = cuda_device(prefill_device), cuda_device(decode_device)
    engine_args = {
        "dtype": "bfloat16", "device": str(prefill_device), "block_size": BLOCK,
        "max_model_len": 2 * num_tokens, "max_num_batched_tokens": num_tokens,
        "num_kv_blocks": 2 * num_tokens // BLOCK + 16, "gpu_memory_utilization": 0.45,
    }  # fmt: skip
    return {"prefill": engine_args, "decode": {**engine_args, "device": str(decode_device)}}


def ttft(
    num_tokens: int,
    rounds: int,
    prefill_device: str | torch.device = "cuda:0",
    decode_device: str | torch.device = "cuda:0",
) -> dict:
    from pdray.sampling_params import SamplingParams

    args_by_role = engine_args_by_role(num_tokens, prefill_device, decode_device)
    devices = {role: args["device"] for role, args in args_by_role.items()}
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for role in ("decode", "prefill"):
        conns[role], child = ctx.Pipe()
        procs.append(ctx.Process(target=_engine_main, args=(role, args_by_role[role], child),
                                 daemon=True))  # fmt: skip
        procs[-1].start()
    ready = {role: _expect(conn, "ready") for role, conn in conns.items()}
    prefill, decode = conns["prefill"], conns["decode"]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    rng = random.Random(0)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    timelines: dict[str, list[dict]] = {mode: [] for mode in MODES}
    token_samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(1 + rounds):  # round 0 warms up
        for mode in MODES:
            request_id = f"ttft-{mode}-{round_}"
            prompt = [rng.randrange(1000, 100_000) for _ in range(num_tokens)]
            ticket = None
            if mode != "prefill_only":
                decode.send(("reserve", (request_id, prompt, params, mode)))
                ticket = _expect(decode, "ticket")[1]
            prefill.send(("submit", (request_id, prompt, params, ticket, mode)))
            submitted = _expect(prefill, "submitted")[1]
            token_at = None  # the first token, streamed to the client before the hand-off
            kinds = ("first_token", "prefilled")
            while (reply := _expect(prefill, kinds, STEP_TIMEOUT_S))[0] != "prefilled":
                token_at = reply[1]
            _, prefilled, error = reply
            if error:
                raise RuntimeError(f"prefill of {request_id} failed: {error}")
            first = prefilled
            if ticket is not None:
                first = _expect(decode, "output", STEP_TIMEOUT_S)[1]  # admitted: KV in place
                while not _expect(decode, "output", STEP_TIMEOUT_S)[2]:
                    pass
            for conn in conns.values():
                conn.send(("trace", ()))
            sends, applies = _expect(prefill, "trace")[1], _expect(decode, "trace")[1]
            if round_:
                samples[mode].append(first - submitted)
                timelines[mode].append(_timeline(submitted, first, sends, applies))
                if token_at is not None:
                    token_samples[mode].append(token_at - submitted)
    for conn in conns.values():
        conn.send(("close", ()))
    for proc in procs:
        proc.join(timeout=60)
    median = {mode: statistics.median(s) for mode, s in samples.items()}
    engine_args = args_by_role["prefill"]
    processes = "two: prefill engine and decode engine on one GPU"
    if devices["prefill"] != devices["decode"]:
        engine_args = {k: v for k, v in engine_args.items() if k != "device"}
        processes = (
            f"two: prefill engine on {devices['prefill']}, decode engine on {devices['decode']}"
        )
    return {
        "model": MODEL,
        "prompt_tokens": num_tokens,
        "processes": processes,
        **({} if devices["prefill"] == devices["decode"] else {"devices": devices}),
        "attention_backend": ready["prefill"][2],
        "engine_args": engine_args,
        "modes": {
            m: dict(zip(("send", "decode_loop_spins", "gil_switch_interval_s"), v, strict=True))
            for m, v in MODES.items()
        },  # fmt: skip
        "ttft_ms": {mode: t * 1e3 for mode, t in median.items()},
        # prefill's first token (what a client gets first since it comes from prefill)
        "prefill_first_token_ms": {
            mode: statistics.median(s) * 1e3 for mode, s in token_samples.items() if s
        },
        "samples_ms": {mode: [t * 1e3 for t in s] for mode, s in samples.items()},
        "vs_prefill_only": {mode: t / median["prefill_only"] for mode, t in median.items()},
        "timeline_median_ms": {
            mode: {k: statistics.median(t[k] for t in ts) for k in ts[0]}
            for mode, ts in timelines.items()
            if ts and ts[0]
        },
        "timelines_ms": timelines,
    }
