#!/usr/bin/env bash
# One pass of GPU checks and timings, sized for a short lease on one GPU (about 7 minutes):
#   1. the Triton kernel tests compiled on the GPU (MEMZOO_TEST_DEVICE=cuda; a test that trips
#      a device-side assert restarts its xdist worker);
#   2. GPU benchmarks: LM presets' training throughput (jrt first), the state-space scans,
#      linear attention (vs SDPA and fla). benchmarks/attention_gpu.py,
#      benchmarks/selective_scan_launch_gpu.py and a short `memzoo train --config
#      configs/hydra-tiny.yaml` run are the other GPU checks.
# Logs and result tables go to $OUT (default /tmp/memzoo-gpu). Optional wheels in .whl/
# (e.g. flash-linear-attention for its baseline rows) are installed to /tmp/site first.
#
#     bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/memzoo-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step() {  # step SECONDS LOG COMMAND...: run with a time limit, keep the log, report the status
    local limit=$1 log=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$log" 2>&1
    echo "== $log: exit $? in $((SECONDS - start)) s"
    tail -n 15 "$OUT/$log"
}

kernel_tests=(tests/kernels --ignore=tests/kernels/test_aot.py -q -p no:randomly --timeout 90
    -n 8 --max-worker-restart 200)
step 170 kernel-tests.log env MEMZOO_TEST_DEVICE=cuda python3 -m pytest "${kernel_tests[@]}"

{
    # jrt first, with launch blocking: an illegal access then names the kernel that made it.
    step 40 jrt.log env CUDA_LAUNCH_BLOCKING=1 python3 benchmarks/lm_presets.py --device cuda \
        --batch 8 --seq-len 1024 --steps 2 --presets jrt based --train-sizes tiny 125m
    step 40 scans.log python3 benchmarks/scans_gpu.py --lengths 2048 8192 16384 --repeats 5
    step 90 linear.log python3 benchmarks/linear_attn_gpu.py --repeats 10
    step 70 presets.log python3 benchmarks/lm_presets.py --device cuda --batch 8 --seq-len 1024 \
        --steps 3 --presets transformer hydra memmamba mom mamba mamba2 --train-sizes tiny 125m
} >"$OUT/benchmarks.log" 2>&1
cat "$OUT/benchmarks.log"
for log in jrt scans linear presets; do
    cat "$OUT/$log.log" >>"$OUT/all-benchmarks.log" 2>/dev/null && rm -f "$OUT/$log.log"
done
tar czf "$OUT/results.tgz" benchmarks/results
