"""Functional ops: tensors in, tensors out.

Each op lives in its own folder (`reference.py` = plain torch oracle and CPU path,
`triton.py` = GPU kernels) and picks a backend per call (`backend="auto"`).
"""

from memzoo.kernels._core import BackendUnavailableError
from memzoo.kernels.attention import KVCache, SlidingWindowCache, attention, attention_step
from memzoo.kernels.conv1d import causal_conv1d, causal_conv1d_update
from memzoo.kernels.linear_attn import (
    based_attn,
    based_attn_step,
    linear_attn,
    linear_attn_step,
    prefix_state,
)
from memzoo.kernels.memmamba import note_attention, note_attention_step, select_notes
from memzoo.kernels.mom import group_by_memory, memory_attn, memory_attn_step, route
from memzoo.kernels.selective_scan import selective_scan, selective_state_update
from memzoo.kernels.ssd import ssd, ssd_step

__all__ = [
    "group_by_memory",
    "memory_attn",
    "memory_attn_step",
    "route",
    "BackendUnavailableError",
    "KVCache",
    "SlidingWindowCache",
    "attention",
    "attention_step",
    "based_attn",
    "based_attn_step",
    "causal_conv1d",
    "causal_conv1d_update",
    "linear_attn",
    "linear_attn_step",
    "note_attention",
    "note_attention_step",
    "prefix_state",
    "select_notes",
    "selective_scan",
    "selective_state_update",
    "ssd",
    "ssd_step",
]
