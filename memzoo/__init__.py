"""memzoo: a zoo of efficient sequence-model layers with their own kernels.

`memzoo.kernels` holds the functional ops (Triton and CUDA kernels with plain-torch
references that are also the CPU path). Run `memzoo info` to see what this machine can use.
"""

__version__ = "0.1.0"
