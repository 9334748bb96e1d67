"""The LM: presets build and train a step, cached generation equals full forwards, save/load
round-trips exactly, configs fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths
from memzoo.models.config import LMConfig, load_config
from memzoo.models.lm import LM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = sorted(p.stem for p in CONFIGS.glob("*-tiny.yaml"))
PRESETS = ("transformer", "based", "mamba", "mamba2", "jrt", "hydra")


def tiny(name: str, **overrides) -> LM:
    config = load_config(CONFIGS / f"{name}.yaml")
    values = {**config.to_dict(), **overrides}
    torch.manual_seed(0)
    return LM(LMConfig.from_dict(values))


def ids(batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_every_preset_has_a_tiny_and_a_gpu_config():
    for preset in PRESETS:
        assert (CONFIGS / f"{preset}-tiny.yaml").is_file()
        assert (CONFIGS / f"{preset}-125m.yaml").is_file()
        load_config(CONFIGS / f"{preset}-125m.yaml")  # validates without building


@pytest.mark.parametrize("name", TINY)
def test_preset_trains_one_step(name):
    model = tiny(name)
    x = ids(2, 48, model.config.vocab_size, seed=0)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    loss = model.loss(x, labels)
    total = loss if model.aux_loss is None else loss + 0.01 * model.aux_loss
    total.backward()
    # An untrained model predicts near-uniformly.
    assert abs(loss.item() - torch.log(torch.tensor(model.config.vocab_size)).item()) < 0.5
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert torch.isfinite(model.loss(x, labels))


# The presets whose layers hold custom autograd Functions or pass state between layers:
# Mamba's chunked scan, Mamba-2, MemMamba's cross-layer reads, Hydra's SWA, MoE and memories.
@pytest.mark.parametrize("name", ["hydra-tiny", "mamba-tiny", "mamba2-tiny", "memmamba-tiny"])
def test_preset_under_torch_compile_matches_eager(name):
    """train.compile: dynamo and AOTAutograd capture the model (backend aot_eager: no code
    generation, so no C++ compiler), and the loss and every gradient match the eager run."""
    model = tiny(name)
    x = ids(2, 24, model.config.vocab_size, seed=0)
    torch._dynamo.reset()
    eager = model(x, labels=x)
    eager.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")(x, labels=x)
    compiled.backward()
    assert_close("loss", eager.detach(), compiled.detach(), 1e-6)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert_close(f"d{n}", grads[n], p.grad, 1e-4)


@pytest.mark.parametrize("name", TINY)
def test_preset_is_causal(name):
    model = tiny(name).double().eval()
    x = ids(1, 40, model.config.vocab_size, seed=1)
    changed = x.clone()
    t = 33  # past every preset's prefix (jrt) and its first MoE / workspace chunks
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert_close("logits <= t", a[:, : t + 1], b[:, : t + 1], 1e-12)


@pytest.mark.parametrize("name", TINY)
def test_greedy_generate_equals_argmax_over_full_forwards(name):
    model = tiny(name).double().eval()
    prompt = ids(2, 37, model.config.vocab_size, seed=2)
    out = model.generate(prompt, 6, greedy=True, prefill_chunk=20)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            token = model(expected)[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, token], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", TINY)
def test_cached_logits_equal_full_forward(name):
    model = tiny(name).double().eval()
    x = ids(2, 45, model.config.vocab_size, seed=3)
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2, 45)
        pieces = [model(x[:, :35], cache=cache), model(x[:, 35:40], cache=cache)]
        pieces += [model(x[:, t : t + 1], cache=cache) for t in range(40, 45)]
    assert cache.seen == 45
    assert_close("cached logits", full, torch.cat(pieces, dim=1), 1e-10)


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trips_exactly(name, tmp_path):
    model = tiny(name).eval()
    model.save_pretrained(tmp_path)
    loaded = LM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k
    x = ids(1, 12, model.config.vocab_size, seed=4)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_rejects_mismatched_weights(tmp_path):
    tiny("transformer-tiny").save_pretrained(tmp_path)
    other = tiny("mamba-tiny")
    (tmp_path / "config.json").write_text(other.config.to_json())
    with pytest.raises(ValueError, match="does not match its config"):
        LM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LM.from_pretrained(tmp_path / "missing")


def test_varlen_equals_per_sequence():
    model = tiny("transformer-tiny").double().eval()
    lengths = [9, 1, 20]
    seqs = [ids(1, n, model.config.vocab_size, seed=10 + i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        packed = model(torch.cat(seqs, dim=1), cu_seqlens=cu_seqlens_from_lengths(lengths))
        alone = torch.cat([model(s) for s in seqs], dim=1)
    assert_close("varlen logits", alone, packed, 1e-10)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny("mamba-tiny").eval()
    prompt = ids(2, 5, model.config.vocab_size, seed=5)

    def sample(seed, **kw):
        return model.generate(prompt, 8, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0, temperature=0.8), sample(0, temperature=0.8))
    assert torch.equal(sample(1, top_k=1), model.generate(prompt, 8, greedy=True))


def test_parallel_block_and_multi_mixer_layers():
    config = LMConfig(
        d_model=32,
        n_layers=2,
        vocab_size=50,
        pattern=["mamba+swa", ["attn"]],
        mixer_options={"swa": {"window": 4, "num_heads": 2}, "attn": {"num_heads": 2}},
        block="parallel",
    )
    model = LM(config).double().eval()
    assert len(model.blocks[0].mixers) == 2 and model.blocks[0].gates.shape == (3,)
    x = ids(1, 14, 50, seed=6)
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(1, 14)
        steps = [model(x[:, :9], cache=cache)] + [
            model(x[:, t : t + 1], cache=cache) for t in range(9, 14)
        ]
    assert_close("parallel block decode", full, torch.cat(steps, dim=1), 1e-10)


def test_state_size_and_num_params():
    model = tiny("transformer-tiny")
    per_layer = [b.mixers[0].state_size(100) for b in model.blocks]
    assert model.state_size(100) == sum(per_layer)
    assert model.state_size(200) == 2 * model.state_size(100)  # attention grows with T
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(embeddings=False) == model.num_params() - model.embed.weight.numel()
    mamba = tiny("mamba-tiny")
    assert mamba.state_size(100) == mamba.state_size(10_000)  # recurrent: constant


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"d_modle": 64}, "unknown key.*d_modle.*valid keys"),
        ({"pattern": ["mamba", "transformer"]}, "unknown mixer 'transformer'.*valid mixers"),
        ({"mixer_options": {"attn": {"heads": 2}}}, "unknown option.*heads.*valid options"),
        ({"ffn": "gelu"}, "unknown FFN 'gelu'"),
        ({"block": "hydra"}, "block must be one of"),
        ({"memories": [{"type": "pkm", "layers": [9]}]}, "layers must list indices"),
        ({"memories": [{"type": "slots", "layers": [0]}]}, "type in"),
        ({"n_layers": 0}, "n_layers must be an int >= 1"),
    ],
    ids=["key", "mixer", "mixer-option", "ffn", "block", "memory-layer", "memory-type", "layers"],
)
def test_config_errors_are_clear(values, message):
    with pytest.raises(ValueError, match=message):
        LMConfig.from_dict(values)


def test_bad_token_ids_are_clear():
    model = tiny("transformer-tiny")
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[0, model.config.vocab_size]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(torch.zeros(3, dtype=torch.long))


def test_residual_output_projections_are_scaled_by_depth():
    model = tiny("mamba-tiny")
    branches = sum(len(b.branches()) for b in model.blocks)
    out = model.blocks[0].mixers[0].out_proj.weight
    bound = out.shape[1] ** -0.5  # nn.Linear's default init: uniform within 1/sqrt(fan_in)
    assert out.abs().max() <= bound / branches**0.5
    assert out.abs().max() > 0.8 * bound / branches**0.5
