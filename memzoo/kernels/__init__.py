"""Functional ops: tensors in, tensors out.

Each op lives in its own folder (`reference.py` = plain torch oracle and CPU path,
`triton.py` = GPU kernels) and picks a backend per call (`backend="auto"`).

Under torch.compile the Triton entry points, and the torch paths built on hand-written
autograd.Functions (the chunked selective scan and linear attention), run eagerly, between
graphs (`torch.compiler.disable`): the kernels are fused already, and dynamo does not capture
their host-side logic, in-place workspaces and strided gradients faithfully. Everything around
them in a model compiles as usual.
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
