"""Device options of the KV transfer benchmark and of the offline disaggregated example (CPU only:
argument parsing and per-side engine arguments, nothing runs on a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pdray.bench.transfer import parse_args
from pdray.bench.transfer_ttft import cuda_device, engine_args_by_role

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "offline_disaggregated.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("offline_disaggregated", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_devices_default_to_one_gpu():
    args = parse_args(["--output", "t.json"])
    assert args.sender_device == args.receiver_device == torch.device("cuda", 0)


def test_bench_devices_parse():
    args = parse_args(["--output", "t.json", "--sender-device", "cuda:0",
                       "--receiver-device", "cuda:1"])  # fmt: skip
    assert (args.sender_device, args.receiver_device) == (
        torch.device("cuda:0"),
        torch.device("cuda:1"),
    )
    assert cuda_device("cuda") == torch.device("cuda:0")
    for bad in ("cpu", "gpu7"):
        with pytest.raises(SystemExit):
            parse_args(["--output", "t.json", "--receiver-device", bad])


def test_ttft_engines_differ_only_in_device():
    one = engine_args_by_role(8192, "cuda:0", "cuda:0")
    assert one["prefill"] == one["decode"]
    assert one["prefill"]["device"] == "cuda:0"
    two = engine_args_by_role(8192, "cuda:0", "cuda:1")
    assert (two["prefill"]["device"], two["decode"]["device"]) == ("cuda:0", "cuda:1")
    assert {**two["decode"], "device": "cuda:0"} == two["prefill"] == one["prefill"]


def test_example_default_has_no_side_args(example):
    assert example.side_args(example.parse_args([])) == {}
    assert example.side_args(example.parse_args(["--transport", "ucx", "--device", "cpu"])) == {}
    same = ["--transport", "cuda_ipc", "--device", "cuda:0", "--prefill-device", "cuda:0"]
    assert example.side_args(example.parse_args(same)) == {}


def test_example_side_devices(example):
    args = example.parse_args(["--transport", "cuda_ipc", "--prefill-device", "cuda:0",
                               "--decode-device", "cuda:1"])  # fmt: skip
    assert example.side_args(args) == {
        "prefill_args": {"device": "cuda:0"},
        "decode_args": {"device": "cuda:1"},
    }
    args = example.parse_args(["--transport", "cuda_ipc", "--device", "cuda:0",
                               "--decode-device", "cuda:1", "--prefill-tp", "2"])  # fmt: skip
    assert example.side_args(args) == {
        "prefill_args": {"tensor_parallel_size": 2},
        "decode_args": {"device": "cuda:1", "tensor_parallel_size": 1},
    }


def test_example_side_args_need_two_processes(example):
    with pytest.raises(SystemExit):
        example.parse_args(["--transport", "local", "--decode-device", "cuda:1"])
