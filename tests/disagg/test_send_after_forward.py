"""Where prefill and decode share a GPU, a step's KV goes in one chunk after the forward instead
of layer by layer during it (`sends_after_forward`); outputs are the same either way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pdray import SamplingParams
from pdray.disagg.prefill import sends_after_forward
from pdray.kv_transfer.base import KVDescriptor, KVLayout, TransportKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kv_transfer"))
from disagg_harness import make_pair, run  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
LAYOUT = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8,
                  dtype="float32")  # fmt: skip


def _receiver(gpu: str | None) -> KVDescriptor:
    extra = {} if gpu is None else {"gpu": gpu}
    return KVDescriptor(engine_id="d", transport=TransportKind.LOCAL, layout=LAYOUT, extra=extra)


def test_only_receivers_all_on_this_gpu_get_the_kv_after_the_forward():
    assert sends_after_forward("GPU-a", [_receiver("GPU-a"), _receiver("GPU-a")])
    assert not sends_after_forward("GPU-a", [_receiver("GPU-a"), _receiver("GPU-b")])
    assert not sends_after_forward("GPU-a", [_receiver(None)])  # a transport that does not say
    assert not sends_after_forward(None, [_receiver(None)])  # a CPU engine
    assert not sends_after_forward("GPU-a", [])  # nothing to send this step


@pytest.mark.parametrize("shared", [True, False], ids=["same-gpu", "other-gpu"])
def test_the_forward_streams_only_to_another_gpu_and_outputs_do_not_change(checkpoint, shared):
    path = checkpoint("llama3")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    kwargs = {"block_size": 4}
    prefill, decode = make_pair(path, prefill_kwargs=kwargs, decode_kwargs=kwargs)
    # as the cuda_ipc transport describes caches on GPUs: this engine's and the receiver's
    prefill._gpu = "GPU-a"
    decode.receivers = [r.model_copy(update={"extra": {"gpu": "GPU-a" if shared else "GPU-b"}})
                        for r in decode.receivers]  # fmt: skip
    calls = []
    on_layer = prefill.sender.on_layer
    prefill.sender.on_layer = lambda layer, n=1: (calls.append((layer, n)), on_layer(layer, n))
    outputs, _ = run(prefill, decode, prompts, GREEDY)
    num_layers = prefill.layout.num_layers
    if shared:  # one call per step that sends, for every layer at once, none from the forward
        assert calls and set(calls) == {(0, num_layers)}
    else:  # the forward's own calls, one a layer
        assert {n for _, n in calls} == {1} and len(calls) % num_layers == 0
    reference, _ = run(*make_pair(path, prefill_kwargs=kwargs, decode_kwargs=kwargs), prompts,
                       GREEDY)  # fmt: skip
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
