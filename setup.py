"""Build memzoo.

The pure-Python package installs everywhere. The CUDA extension (`memzoo._C`, sources in
csrc/) is built only when the build environment has a CUDA build of torch and a CUDA
toolkit, e.g. `pip install --no-build-isolation -e .` on a GPU machine. Anywhere else it is
skipped with a message, and memzoo falls back to its Triton and torch kernels.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _skip(reason):
    print(f"memzoo: not building the CUDA extension ({reason}); Triton/torch kernels are used")
    return {}


def _cuda_extension():
    """Return setup() keyword arguments for the CUDA extension, or {} when it cannot be built."""
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").rglob("*.cu"))
    sources += sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").rglob("*.cpp"))
    if not sources:
        return _skip("no sources in csrc/")
    if os.environ.get("MEMZOO_SKIP_CUDA_BUILD", "0") == "1":
        return _skip("MEMZOO_SKIP_CUDA_BUILD=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment; use --no-build-isolation")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME)")
    archs = os.environ.get("MEMZOO_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    extension = CUDAExtension(
        name="memzoo._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", *gencode]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
