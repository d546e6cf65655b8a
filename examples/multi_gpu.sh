#!/usr/bin/env bash
# The multi-GPU runs (needs 2 GPUs of one host; docs/multi_gpu.md says what each step shows):
#   1. TP=2 over NCCL: greedy parity with TP=1 (tiny checkpoints), decode step time TP2 / TP1
#   2. prefill on GPU 0, decode on GPU 1, KV by cuda_ipc with peer access: outputs equal mixed,
#      an 8k prompt's KV transfer against the same run's peer copy bandwidth
#   3. serving: 1 prefill + 1 decode on two GPUs vs 2 mixed replicas on the same two GPUs
#
#   bash examples/multi_gpu.sh OUT [STEP...]     (steps 1 2 3 by default)
#
# Step 3 in two parts, e.g. one per device call: 3p (1P1D only), then 3m (mixed, and the
# comparison once both sweeps are in OUT). BENCH_FLAGS adds pdray.bench.serve flags to step 3
# (e.g. BENCH_FLAGS="--disable-tqdm --no-plots").
set -euo pipefail
out=$1
shift
steps=${*:-1 2 3}
mkdir -p "$out"
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM, in every process started from here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
model=dummy:llama3-8b
for step in $steps; do
    case $step in
    1)
        PDRAY_TP_TEST_DEVICE=cuda python -m pytest -q tests/test_tensor_parallel.py \
            tests/test_tensor_parallel_lifecycle.py -k "not placement" -p no:cacheprovider \
            | tee "$out/tp_parity.txt"
        python -m pytest -q tests/kv_transfer/test_tensor_parallel_transfer.py -k cuda_ipc \
            -p no:cacheprovider | tee "$out/pd_tp.txt"
        python -m pdray.bench.engine --model $model --batch-sizes 1 64 --prefill-lens 8192 \
            --no-hf --tensor-parallel-size 1 --out "$out/engine_tp1.json"
        python -m pdray.bench.engine --model $model --batch-sizes 1 64 --prefill-lens 8192 \
            --tensor-parallel-size 2 --out "$out/engine_tp2.json"
        python -m pdray.bench.engine --compare "$out/engine_tp1.json" "$out/engine_tp2.json" \
            | tee "$out/engine_tp2_over_tp1.txt"
        ;;
    2)
        python examples/offline_disaggregated.py --transport cuda_ipc \
            --prefill-device cuda:0 --decode-device cuda:1 | tee "$out/pd_two_gpus.txt"
        python -m pdray.bench.transfer --output "$out/transfer_2gpu.json" \
            --sender-device cuda:0 --receiver-device cuda:1
        ;;
    3 | 3p | 3m)
        flags=(--dataset-name random --vocab-size 128256 --random-input-len 2048
               --random-output-len 192 --random-range-ratio 0.33 --num-prompts 200
               --request-rates 2,4,8,12,16 --ignore-eos --num-warmups 4 --seed 0
               --goodput ttft:1000 tpot:40 ${BENCH_FLAGS:-})
        if [ "$step" != 3m ]; then
            bash examples/serve_benchmark.sh examples/serve_1p1d_2gpu.yaml "$out" 1p1d \
                "${flags[@]}" --breakdown  # where the 1P1D TTFT goes (PD spans)
        fi
        if [ "$step" != 3p ]; then
            bash examples/serve_benchmark.sh examples/serve_mixed_2gpu.yaml "$out" mixed "${flags[@]}"
            python -m pdray.bench.serve_compare "$out/1p1d-sweep.json" "$out/mixed-sweep.json" \
                --plot "$out/1p1d_vs_mixed.png" | tee "$out/1p1d_vs_mixed.md"
        fi
        ;;
    *) echo "unknown step $step (1, 2, 3, 3p or 3m)" >&2; exit 2 ;;
    esac
done
