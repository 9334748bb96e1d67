#!/usr/bin/env bash
# One pass of GPU checks and timings, sized for a short lease on one GPU (about 10 minutes on
# a fresh machine, most of it compiling kernels):
#   1. the Triton kernel tests compiled on the GPU (MEMZOO_TEST_DEVICE=cuda; the bad-value
#      cases marked `device_assert` are left out there, and test_device_asserts.py checks the
#      device-side asserts in subprocesses), and the Mamba mixers against their CPU path. Each
#      test's outcome is logged as it finishes, so a run cut off by its time limit still says
#      which tests passed and failed;
#   2. GPU benchmarks: LM presets' training throughput, linear attention (vs SDPA and fla),
#      the state-space scans, the selective scan with and without segments (B=1), the
#      selective scan's tiled main passes against its looped ones (`looped`), and the decode
#      steps of Mamba-1 and Mamba-2 (vs mamba-ssm's, if importable).
#      benchmarks/attention_gpu.py, the other launch shapes of
#      benchmarks/selective_scan_launch_gpu.py and a short `memzoo train --config
#      configs/hydra-tiny.yaml` run are the other GPU checks.
# Logs and result tables go to $OUT (default /tmp/memzoo-gpu). Optional wheels in .whl/
# (e.g. flash-linear-attention for its baseline rows) are installed to /tmp/site first; fla's
# kernels autotune for over a minute per script on a fresh machine, so leave them out of a
# short lease. Python source trees and extension modules in .whl/src (e.g. mamba-ssm's sources,
# whose SSD is Triton code, and its selective_scan_cuda built for the GPU machine's torch and
# Python) go on PYTHONPATH; objects in .whl/mss from `benchmarks/mamba_ssm_cuda.sh objects` are
# linked into .whl/src first (about 40 s).
#
#     bash benchmarks/gpu_session.sh [STEP...]
#
# STEPs (default: tests presets linear scans segments decode; `looped` only on request):
# `tests` is every kernel test and the GPU mixer test; `ssm-tests` only the selective-scan, SSD,
# skip-and-gate and occupancy kernel tests and the GPU mixer test; the others are the benchmarks
# of part 2, by the name of their log.
set -u
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests presets linear scans segments decode)
for name in "${steps[@]}"; do  # refuse a misspelt step before spending device time on the rest
    case $name in
    tests | ssm-tests | presets | linear | scans | segments | looped | decode) ;;
    *) echo "unknown step: $name (tests ssm-tests presets linear scans segments looped" \
        "decode)" >&2 && exit 2 ;;
    esac
done
OUT=${OUT:-/tmp/memzoo-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -d .whl/src ]; then
    export PYTHONPATH=$PYTHONPATH:$PWD/.whl/src
fi
# mamba-ssm's CUDA selective scan, from objects compiled elsewhere (benchmarks/mamba_ssm_cuda.sh).
if ls .whl/mss/*.o >/dev/null 2>&1 && ! ls .whl/src/selective_scan_cuda*.so >/dev/null 2>&1; then
    bash benchmarks/mamba_ssm_cuda.sh link .whl/mss .whl/src >"$OUT/mamba-ssm-link.log" 2>&1
    echo "== mamba-ssm's selective_scan_cuda: link exit $?" && tail -n 1 "$OUT/mamba-ssm-link.log"
    export PYTHONPATH=$PYTHONPATH:$PWD/.whl/src
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

mixer_test=tests/models/test_mamba_mixers.py::test_gpu_mixer_matches_the_cpu_path
ssm_tests=(tests/kernels/test_selective_scan_triton.py tests/kernels/test_selective_scan_reference.py
    tests/kernels/test_ssd.py)
kernel_tests() {  # kernel_tests LIMIT TESTS...: compiled on the GPU, each outcome logged
    local limit=$1
    shift
    step "$limit" kernel-tests.log env MEMZOO_TEST_DEVICE=cuda python3 -m pytest "$@" \
        -v -p no:randomly --timeout 120 -n 12 --max-worker-restart 50
    echo "== kernel tests, outcomes logged:"
    grep -oE "(PASSED|FAILED|ERROR) tests/\S+" "$OUT/kernel-tests.log" | sort -u | awk '{print $1}' | uniq -c
    grep -oE "(FAILED|ERROR) tests/\S+" "$OUT/kernel-tests.log" | sort -u | head -40
}

# fla-core (a test dependency, the second oracle) is seldom installed on a GPU machine.
skip_fla=()
python3 -c "import fla" 2>/dev/null || skip_fla=(--ignore=tests/kernels/test_fla_oracle.py)
ssm_tests+=(tests/kernels/test_occupancy.py tests/kernels/test_skip_gate_triton.py)

for name in "${steps[@]}"; do
    case $name in
    tests) kernel_tests 240 tests/kernels --ignore=tests/kernels/test_aot.py "${skip_fla[@]}" \
        "$mixer_test" ;;
    ssm-tests) kernel_tests 200 "${ssm_tests[@]}" "$mixer_test" ;;
    presets)
        step 100 presets.log python3 benchmarks/lm_presets.py --device cuda --batch 8 \
            --seq-len 1024 --steps 3 --presets jrt based transformer hydra memmamba mom mamba \
            mamba2 --train-sizes tiny 125m
        ;;
    linear) step 90 linear.log python3 benchmarks/linear_attn_gpu.py --repeats 10 ;;
    # mamba-ssm's SSD autotunes each of its kernels on first use: the scans need the longest.
    scans) step 180 scans.log python3 benchmarks/scans_gpu.py --lengths 2048 8192 16384 --repeats 5 ;;
    # One sequence: the launch the segments widen most (both passes), against none.
    segments)
        step 60 segments.log python3 benchmarks/selective_scan_launch_gpu.py --batch 1 \
            --lengths 2048 16384 --variants shipped --segments rule whole \
            --name selective_scan_segments-b1
        ;;
    # The tiled main passes against the looped ones, each way and mixed (two looped backward
    # shapes), at B=2.
    looped)
        step 240 looped.log python3 benchmarks/selective_scan_launch_gpu.py --batch 2 \
            --lengths 2048 16384 --variants shipped --segments rule \
            --forms tiles/tiles looped/looped tiles/looped looped/tiles \
            --looped-backward 32,4,4 32,8,8 --name selective_scan_forms
        ;;
    decode) step 60 decode.log python3 benchmarks/decode_step_gpu.py --batches 1 64 ;;
    esac
done
for log in presets linear scans segments looped decode; do
    cat "$OUT/$log.log" >>"$OUT/all-benchmarks.log" 2>/dev/null && rm -f "$OUT/$log.log"
done
tar czf "$OUT/results.tgz" benchmarks/results
