"""The checks every mixer must pass (DESIGN.md, "Layer (mixer) contract").

Each takes a built mixer and runs it in fp64 by default, so exact identities (causality,
prefill + decode == full, varlen == per sequence) are checked to ~1e-12, not to fp32 noise.
"""

from __future__ import annotations

import torch

from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn


def inputs(mixer, batch: int, seq_len: int, *, seed: int, dtype=torch.float64) -> torch.Tensor:
    return randn(batch, seq_len, mixer.d_model, seed=seed, dtype=dtype)


def check_causal(mixer, *, batch: int = 2, seq_len: int = 20, t: int = 9, ratio=1e-12):
    """Changing tokens after t changes no output at positions <= t (and does change later ones)."""
    mixer = mixer.double().eval()
    x = inputs(mixer, batch, seq_len, seed=1)
    changed = x.clone()
    changed[:, t + 1 :] += randn(batch, seq_len - t - 1, mixer.d_model, seed=2, dtype=x.dtype)
    with torch.no_grad():
        y, y_changed = mixer(x), mixer(changed)
    assert_close("outputs <= t", y[:, : t + 1], y_changed[:, : t + 1], ratio)
    assert not torch.allclose(y[:, t + 1 :], y_changed[:, t + 1 :]), "later outputs ignore input"


def check_prefill_decode(
    mixer, *, batch: int = 2, prompt: int = 7, chunk: int = 5, decode: int = 6, ratio=1e-10
):
    """A prompt, then a second prompt chunk, then token-by-token decode == one full forward."""
    mixer = mixer.double().eval()
    T = prompt + chunk + decode
    x = inputs(mixer, batch, T, seed=3)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.init_cache(batch, device=x.device, dtype=x.dtype, max_seq_len=T)
        pieces = [mixer(x[:, :prompt], cache=cache)]
        pieces.append(mixer(x[:, prompt : prompt + chunk], cache=cache))
        for t in range(prompt + chunk, T):
            pieces.append(mixer(x[:, t : t + 1], cache=cache))
    assert_close("prefill + decode", full, torch.cat(pieces, dim=1), ratio)


def check_varlen(mixer, *, lengths=(5, 1, 12, 8), ratio=1e-10):
    """A packed batch (cu_seqlens) == each sequence alone."""
    mixer = mixer.double().eval()
    seqs = [inputs(mixer, 1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        packed = mixer(torch.cat(seqs, dim=1), cu_seqlens=cu)
        alone = torch.cat([mixer(s) for s in seqs], dim=1)
    assert_close("varlen", alone, packed, ratio)


def check_gradients(mixer, *, batch: int = 2, seq_len: int = 16, dtype=torch.float32):
    """Backward reaches every parameter with finite, not-all-zero gradients."""
    mixer = mixer.to(dtype).train()
    x = inputs(mixer, batch, seq_len, seed=4, dtype=dtype).requires_grad_()
    y = mixer(x)
    loss = y.square().mean()
    if mixer.aux_loss is not None:
        loss = loss + mixer.aux_loss
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
