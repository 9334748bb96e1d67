"""Sequence mixers, one per file, registered by name.

`MIXERS` maps each name to "module:Class"; `build_mixer(name, d_model, layer_idx, **options)`
builds one and reports unknown names or options with the valid ones listed.

| name          | layer                                         | file              |
|---------------|-----------------------------------------------|-------------------|
| `attn`        | causal multi-head attention, RoPE, GQA        | attention.py      |
| `swa`         | sliding-window attention, ring-buffer cache   | sliding_window.py |
| `linear_attn` | linear attention (feature maps, GLA decay)    | linear_attention.py |
| `based`       | BASED Taylor linear attention                 | based.py          |
| `short_conv`  | gated short convolution (BASED)               | short_conv.py     |
| `mamba`       | Mamba-1 block                                 | mamba.py          |
| `mamba2`      | Mamba-2 block (SSD)                           | mamba2.py         |
| `jrt`         | JRT-RNN prefix linear attention               | jrt.py            |
| `mom`         | Mixture-of-Memories linear attention          | mom.py            |
| `memmamba`    | Mamba + note pool (cross-token/-layer reads)  | memmamba.py       |
"""

from __future__ import annotations

import importlib
import inspect

from memzoo.models.mixers.base import Mixer, check_mixer_input

__all__ = ["MIXERS", "Mixer", "build_mixer", "check_mixer_input", "mixer_class", "mixer_options"]

MIXERS: dict[str, str] = {
    "attn": "attention:Attention",
    "swa": "sliding_window:SlidingWindowAttention",
    "linear_attn": "linear_attention:LinearAttention",
    "based": "based:Based",
    "short_conv": "short_conv:ShortConvMixer",
    "mamba": "mamba:Mamba",
    "mamba2": "mamba2:Mamba2",
    "jrt": "jrt:JRTLinearAttention",
    "mom": "mom:MixtureOfMemories",
    "memmamba": "memmamba:MemMamba",
}


def mixer_class(name: str) -> type[Mixer]:
    """The class registered as `name` (imported on first use)."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(MIXERS))}")
    module, cls = MIXERS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def mixer_options(name: str) -> dict[str, object]:
    """The options `name` takes beyond (d_model, layer_idx), with their defaults."""
    params = inspect.signature(mixer_class(name).__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name not in ("self", "d_model", "layer_idx") and p.kind == p.KEYWORD_ONLY
    }


def build_mixer(name: str, d_model: int, layer_idx: int = 0, **options) -> Mixer:
    """Build mixer `name`; an unknown option is an error listing the valid ones."""
    valid = mixer_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"mixer {name!r}: unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(sorted(valid)) or '(none)'}"
        )
    return mixer_class(name)(d_model, layer_idx, **options)
