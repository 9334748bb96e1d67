"""memzoo's Mamba and Mamba-2 layers against Hugging Face transformers' MambaMixer and
Mamba2Mixer, with the same weights.

The parameters share names and shapes (mamba-ssm's layout) except the conv weight, which
torch's nn.Conv1d keeps as `[D, 1, W]` where memzoo's ShortConv keeps `[D, W]`. So a state dict
moves from one to the other with one unsqueeze: a checkpoint trained here loads there, and the
forward passes agree. transformers (a test dependency) runs its plain-torch paths on CPU;
its mixers run under no_grad, so only the forward is compared.
"""

import logging

import pytest
import torch
from transformers import Mamba2Config, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from memzoo.kernels.testing import assert_close
from memzoo.models.mixers.mamba import Mamba
from memzoo.models.mixers.mamba2 import Mamba2

# transformers logs, on every call, that it falls back to torch without mamba-ssm installed.
logging.getLogger("transformers").setLevel(logging.ERROR)

D_MODEL = 32


def _perturbed(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The layer in eval mode with every parameter moved off its init (D = 1, zero biases...),
    so that a parameter read in the wrong place shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return layer.eval()


def _transformers_state(layer: torch.nn.Module) -> dict:
    state = {name: t.clone() for name, t in layer.state_dict().items()}
    state["conv1d.weight"] = state["conv1d.weight"].unsqueeze(1)
    return state


def _outputs(ours: torch.nn.Module, theirs: torch.nn.Module, T: int, seed: int):
    x = torch.randn(2, T, D_MODEL, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = ours(x)
        ref = theirs(x)
    return ref, out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_mamba_equals_transformers_mamba_mixer(T, bias):
    ours = _perturbed(Mamba(D_MODEL, d_state=8, d_conv=4, expand=2, bias=bias), seed=0)
    config = MambaConfig(
        hidden_size=D_MODEL, state_size=8, conv_kernel=4, expand=2,
        time_step_rank=ours.dt_rank, use_conv_bias=True, use_bias=bias, num_hidden_layers=1,
    )  # fmt: skip
    theirs = MambaMixer(config, 0).eval()
    theirs.load_state_dict(_transformers_state(ours))
    ref, out = _outputs(ours, theirs, T, seed=1)
    assert_close("out", ref, out, 1e-5)


@pytest.mark.parametrize("T", [1, 37, 64])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_equals_transformers_mamba2_mixer(T, ngroups):
    ours = _perturbed(
        Mamba2(D_MODEL, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=ngroups), seed=2
    )
    config = Mamba2Config(
        hidden_size=D_MODEL, state_size=16, conv_kernel=4, expand=2, head_dim=16,
        num_heads=2 * D_MODEL // 16, n_groups=ngroups, use_conv_bias=True, use_bias=False,
        norm_before_gate=False, rms_norm=True, chunk_size=16, num_hidden_layers=1,
    )  # fmt: skip
    theirs = Mamba2Mixer(config, 0).eval()
    theirs.load_state_dict(_transformers_state(ours))
    ref, out = _outputs(ours, theirs, T, seed=3)
    assert_close("out", ref, out, 1e-5)
