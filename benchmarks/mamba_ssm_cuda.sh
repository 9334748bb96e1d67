#!/usr/bin/env bash
# Build mamba-ssm's CUDA selective scan (`selective_scan_cuda`, behind its selective_scan_fn),
# the baseline of benchmarks/scans_gpu.py, in two halves: the slow one where time is cheap, the
# quick one on the GPU machine, which may have neither a package index nor much time.
#
#   bash benchmarks/mamba_ssm_cuda.sh objects SRC OUT
#       On any machine with nvcc and torch (CPU torch will do: only its headers are read).
#       Compiles SRC/csrc/selective_scan/*.cu (SRC: mamba-ssm's unpacked sdist, e.g. 2.3.2.post1)
#       for ARCH (default 90: H100, H200) into OUT, with the binding's sources beside them;
#       several minutes, JOBS (default 2) files at a time.
#   bash benchmarks/mamba_ssm_cuda.sh link OUT SITE
#       On the GPU machine: compiles the binding against its torch and Python, links it with
#       the objects in OUT into SITE/selective_scan_cuda*.so and imports it; about 40 s.
#
# Put mamba-ssm's Python package (SRC/mamba_ssm) and the linked module on PYTHONPATH: that is
# what benchmarks/gpu_session.sh does with .whl/src, linking .whl/mss there first if need be.
set -euo pipefail

torch_flags() {  # include (and with `link`, library) flags of the torch python3 imports
    python3 - "$1" <<'PY'
import sys, sysconfig, torch
from torch.utils import cpp_extension as ext
link = sys.argv[1] == "link"
def paths(kind):  # torch's own; with `link` the CUDA toolkit's too (nvcc finds its own)
    fn = getattr(ext, kind)
    try:
        return fn("cuda" if link else "cpu")
    except TypeError:  # torch before 2.6 takes a flag
        return fn(cuda=link)
flags = ["-I" + p for p in paths("include_paths")]
flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
if link:
    flags += ["-I" + sysconfig.get_paths()["include"]] + ["-L" + p for p in paths("library_paths")]
print(" ".join(flags))
PY
}

objects() {
    local src=$1/csrc/selective_scan out=$2
    [ -d "$src" ] || { echo "no $src: SRC is mamba-ssm's unpacked source tree" >&2; exit 2; }
    mkdir -p "$out/include/c10/cuda/impl"
    # A header CMake generates when torch is built with CUDA; CPU wheels lack it.
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
        >"$out/include/c10/cuda/impl/cuda_cmake_macros.h"
    cp "$src"/selective_scan.cpp "$src"/*.h "$src"/*.cuh "$out/"
    local flags
    flags=$(torch_flags objects)
    flags+=" -I$out/include"
    # mamba-ssm's own nvcc flags (its setup.py), for one architecture.
    flags+=" -O3 -std=c++17 --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math"
    flags+=" -lineinfo -Xcompiler -fPIC -gencode arch=compute_${ARCH:-90},code=sm_${ARCH:-90}"
    for macro in HALF_OPERATORS HALF_CONVERSIONS BFLOAT16_OPERATORS BFLOAT16_CONVERSIONS \
        BFLOAT162_OPERATORS BFLOAT162_CONVERSIONS; do
        flags+=" -U__CUDA_NO_${macro}__"
    done
    export flags out
    # shellcheck disable=SC2016  # expanded by the inner shell
    ls "$src"/*.cu | xargs -P "${JOBS:-2}" -I{} sh -c \
        'f={}; b=$(basename "$f" .cu); nvcc -c "$f" -o "$out/$b.o" $flags && echo "built $b.o"'
}

link() {
    local out=$1 site=$2 suffix flags
    mkdir -p "$site"
    suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    flags=$(torch_flags link)
    # shellcheck disable=SC2086  # the flags are words
    c++ -O2 -fPIC -shared -std=c++17 $flags -I/usr/local/cuda/include \
        -DTORCH_EXTENSION_NAME=selective_scan_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
        "$out/selective_scan.cpp" "$out"/*.o -lc10 -ltorch -ltorch_cpu -ltorch_python \
        -lc10_cuda -ltorch_cuda -L/usr/local/cuda/lib64 -lcudart \
        -o "$site/selective_scan_cuda$suffix"
    PYTHONPATH=$site python3 -c "import torch, selective_scan_cuda as m; print('linked', m.__file__)"
}

usage() {
    sed -n '2,16p' "$0" >&2
    exit 2
}
[ $# -eq 3 ] || usage
case $1 in
objects) objects "$2" "$3" ;;
link) link "$2" "$3" ;;
*) usage ;;
esac
