"""The MemMamba mixer (`memmamba`): the mixer contract, its note pool and read gate, and LMs that
read the pools of earlier layers (cross-layer)."""

from __future__ import annotations

import pytest
import torch

from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn
from memzoo.models.config import LMConfig
from memzoo.models.lm import LM
from memzoo.models.mixers import build_mixer
from memzoo.models.mixers.memmamba import MemMamba
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)

D_MODEL = 32
SMALL = dict(ssm_options=dict(d_state=8), note_dim=16, pool_size=4)

# (options, test id): Mamba-1 and Mamba-2 blocks, several note heads, a one-note pool, every
# token writing (tau1 = 0), and inference-time read skipping (tau2).
CONFIGS = [
    (SMALL, "mamba1-note16-K4"),
    ({**SMALL, "note_heads": 2}, "mamba1-note16x2heads-K4"),
    (dict(ssm="mamba2", ssm_options=dict(d_state=8, headdim=16), note_dim=8, pool_size=3),
     "mamba2-note8-K3"),
    ({**SMALL, "pool_size": 1, "tau1": 0.0}, "mamba1-K1-all-write"),
    ({**SMALL, "tau2": 0.5}, "mamba1-K4-tau2"),
]  # fmt: skip
CONFIG_IDS = [c[1] for c in CONFIGS]


def build(options: dict, *, seed: int = 0, layer_idx: int = 0) -> MemMamba:
    torch.manual_seed(seed)
    return build_mixer("memmamba", D_MODEL, layer_idx, **options)


@pytest.mark.parametrize("options,_", CONFIGS, ids=CONFIG_IDS)
def test_causal(options, _):
    check_causal(build(options))


@pytest.mark.parametrize("options,_", CONFIGS, ids=CONFIG_IDS)
def test_prefill_then_decode_equals_full_forward(options, _):
    check_prefill_decode(build(options))


def test_single_token_prompt_then_chunks():
    """The first call is already a one-token step on an empty pool."""
    check_prefill_decode(build(SMALL), prompt=1, chunk=2, decode=3)


@pytest.mark.parametrize("options,_", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_varlen_equals_each_sequence_alone(options, _):
    check_varlen(build(options))


@pytest.mark.parametrize("options,_", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_gradients_reach_every_parameter(options, _):
    check_gradients(build(options))


def test_scorer_learns_only_through_the_notes_that_are_read():
    """Notes are s_t * W x_t, so the scorer's gradient is nonzero exactly when notes are read
    (tau1 = 1 writes none: then it gets none)."""
    x = randn(2, 12, D_MODEL, seed=1)
    for tau1, reads in ((0.5, True), (1.0, False)):
        mixer = build({**SMALL, "tau1": tau1})
        mixer(x).square().sum().backward()
        assert (mixer.score.weight.grad.abs().sum() > 0) == reads


def test_a_token_with_no_visible_note_outputs_the_mamba_block_alone():
    mixer = build({**SMALL, "tau1": 1.0}).double().eval()  # no token ever writes a note
    x = randn(2, 9, D_MODEL, seed=2, dtype=torch.float64)
    with torch.no_grad():
        y, m = mixer(x), mixer.ssm(x)
    assert torch.isfinite(y).all()
    assert_close("no notes", m, y, 1e-15)
    with torch.no_grad():
        first = build(SMALL).double().eval()
        assert_close("t = 0", first.ssm(x)[:, 0], first(x)[:, 0], 1e-15)


def test_tau2_drops_low_gate_reads_only_in_eval_mode():
    mixer = build({**SMALL, "tau2": 0.5}).double()
    x = randn(2, 10, D_MODEL, seed=3, dtype=torch.float64)
    with torch.no_grad():
        mixer.gate.weight.zero_()
        mixer.gate.bias.fill_(-1.0)  # every gate is sigmoid(-1) = 0.27 < tau2
        trained, evaluated = mixer.train()(x), mixer.eval()(x)
        m = mixer.ssm(x)
    assert_close("eval skips", m, evaluated, 1e-15)
    assert not torch.equal(trained, evaluated)


def test_state_size_is_the_mamba_state_plus_the_pool():
    mixer = build(SMALL)
    d_inner = 2 * D_MODEL
    assert mixer.state_size(1) == mixer.state_size(10_000) == d_inner * (8 + 3) + 4 * 16
    cache = mixer.init_cache(3)
    assert cache.pool.shape == (3, 4, 1, 16) and cache.count.shape == (3,)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"note_dim": 10, "note_heads": 3}, "divisible by note_heads"),
        ({"ssm": "attn"}, "ssm must be one of"),
        ({"pool_size": 0}, "pool_size must be an int >= 1"),
        ({"tau2": 1.0}, "tau2 must be in"),
        ({"ssm_options": {"d_stat": 4}}, "unknown option.*d_stat"),
    ],
    ids=["heads", "ssm", "pool", "tau2", "ssm-option"],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_mixer("memmamba", D_MODEL, 0, **options)


# ---------------------------------------------------------------------------------------------
# LMs with cross-layer reads: [memmamba] * 4 with p = 2 (layers 1 and 3 read earlier pools)


def tiny_lm(*, seed: int = 0, dtype=torch.float64) -> LM:
    torch.manual_seed(seed)
    config = LMConfig(
        d_model=D_MODEL,
        n_layers=4,
        vocab_size=40,
        pattern=["memmamba"],
        mixer_options={"memmamba": {**SMALL, "cross_layer_every": 2}},
        ffn="none",
    )
    return LM(config).to(dtype).eval()


def test_lm_wires_each_cross_layer_layer_to_the_previous_p_layers():
    lm = tiny_lm()
    mixers = [block.mixers[0] for block in lm.blocks]
    assert [[s.layer_idx for s in m.sources] for m in mixers] == [[], [0], [], [1, 2]]
    assert [m.cross_q_proj is not None for m in mixers] == [False, True, False, True]
    # References are not submodules: no parameter is counted or saved twice.
    assert not any("sources" in name for name in lm.state_dict())
    assert lm.num_params() == sum(p.numel() for _, p in lm.named_parameters(remove_duplicate=False))


def test_lm_cross_layer_read_reaches_earlier_layers_notes():
    """Layer 3's cross-layer read takes gradient into layer 1's note projection."""
    lm = tiny_lm(dtype=torch.float32).train()
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = lm.hidden_states(ids)
    hidden.square().sum().backward()
    assert lm.blocks[3].mixers[0].cross_q_proj.weight.grad.abs().sum() > 0
    assert lm.blocks[3].mixers[0].cross_out_proj.weight.grad.abs().sum() > 0


def test_lm_is_causal():
    lm = tiny_lm()
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 40
    with torch.no_grad():
        a, b = lm(ids), lm(changed)
    assert_close("logits <= 11", a[:, :12], b[:, :12], 1e-12)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_lm_prefill_then_decode_equals_full_forward():
    lm = tiny_lm()
    ids = torch.randint(0, 40, (2, 18), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = lm(ids)
        cache = lm.init_cache(2, 18)
        pieces = [lm(ids[:, :7], cache=cache), lm(ids[:, 7:11], cache=cache)]
        pieces += [lm(ids[:, t : t + 1], cache=cache) for t in range(11, 18)]
    assert_close("prefill + decode", full, torch.cat(pieces, dim=1), 1e-10)


def test_lm_varlen_equals_each_sequence_alone():
    lm = tiny_lm()
    lengths = [6, 1, 11]
    ids = torch.randint(0, 40, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        packed = lm(ids, cu_seqlens=cu)
        alone = [lm(ids[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    assert_close("varlen", torch.cat(alone, dim=1), packed, 1e-10)


def test_lm_greedy_generate_equals_argmax_over_full_forwards():
    lm = tiny_lm()
    prompt = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    generated = lm.generate(prompt, 8, greedy=True, prefill_chunk=4)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_lm_state_size_adds_every_pool():
    lm = tiny_lm()
    per_layer = 2 * D_MODEL * (8 + 3) + 4 * 16
    assert lm.state_size(4096) == 4 * per_layer


def test_a_layer_whose_sources_have_not_run_raises():
    lm = tiny_lm()
    x = randn(1, 5, D_MODEL, seed=5, dtype=torch.float64)
    lm.blocks[0].mixers[0](x)
    with pytest.raises(RuntimeError, match="has not run on this input"):
        lm.blocks[3].mixers[0](x)
