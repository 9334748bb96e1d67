"""Layers and language models built on `memzoo.kernels`.

`mixers/` holds one sequence mixer per file (registered by name in `mixers.MIXERS`);
`ffn.py` and `memory.py` the channel mixers and Hydra memories; `lm.py` the LM assembled
from a layer pattern (`config.py`), with per-layer inference state in `cache.py`.
"""
