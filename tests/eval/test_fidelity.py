"""Memory fidelity: the estimator equals its definition (brute-force Jacobians), the documented
properties hold exactly, and `memzoo eval fidelity` writes its JSON and plot."""

import argparse
import json

import pytest
import torch

from memzoo.eval.fidelity import add_fidelity_parser, load_model, memory_fidelity
from memzoo.kernels.testing import assert_close
from memzoo.models.config import LMConfig
from memzoo.models.lm import LM

MEMMAMBA = {"ssm_options": {"d_state": 4}, "note_dim": 8, "pool_size": 3, "cross_layer_every": 2}


def tiny_lm(pattern, mixer_options=None, *, d_model=8, n_layers=2, ffn="none", dtype=torch.float64):
    torch.manual_seed(0)
    config = LMConfig(
        d_model=d_model,
        n_layers=n_layers,
        vocab_size=20,
        pattern=pattern,
        mixer_options=mixer_options or {},
        ffn=ffn,
    )
    return LM(config).to(dtype)


def token_ids(N, T, seed=0):
    return torch.randint(0, 20, (N, T), generator=torch.Generator().manual_seed(seed))


def brute_force(model, ids, max_distance):
    """Both metrics from full Jacobians, one sequence at a time (the module's definitions)."""
    d, s, L = model.config.d_model, ids.shape[1] - 1, len(model.blocks)
    horizontal = torch.zeros(L, max_distance + 1, dtype=torch.float64)
    vertical = torch.zeros(L, max_distance + 1, dtype=torch.float64)
    for n in range(ids.shape[0]):
        e = model.embed(ids[n : n + 1]).detach()
        streams = [e]
        for block in model.blocks:  # records every layer's input and publishes note pools
            streams.append(block(streams[-1]).detach())
        back = s - torch.arange(max_distance + 1)
        for layer in range(L):

            def within(x, layer=layer):
                return model.blocks[layer](x)[0, s]

            def through(x, layer=layer):
                for block in model.blocks[: layer + 1]:
                    x = block(x)
                return x[0, s]

            # jacobian [d, 1, T, d]: ||d out_s / d in_t||_F^2 summed over (out, in) features.
            jac = torch.autograd.functional.jacobian(within, streams[layer])
            horizontal[layer] += jac[:, 0, back].pow(2).sum((0, 2))
            jac = torch.autograd.functional.jacobian(through, e)
            vertical[layer] += jac[:, 0, back].pow(2).sum((0, 2))
    horizontal = (horizontal / horizontal[:, :1]).sqrt()
    return horizontal, (vertical / ids.shape[0] / d).sqrt()


@pytest.mark.parametrize(
    "pattern,options",
    [(["mamba"], {"mamba": {"d_state": 4}}), (["memmamba"], {"memmamba": MEMMAMBA})],
    ids=["mamba-L2-d8", "memmamba-crosslayer-L2-d8"],
)
def test_exact_estimate_equals_brute_force_jacobian_norms(pattern, options):
    model = tiny_lm(pattern, options).eval()
    ids = token_ids(2, 7)
    result = memory_fidelity(model, ids, max_distance=5, num_probes=None)
    horizontal, vertical = brute_force(model, ids, 5)
    assert_close("horizontal", horizontal, result.horizontal, 1e-10)
    assert_close("vertical", vertical, result.vertical, 1e-10)


def test_layers_that_ignore_the_past_have_zero_fidelity_beyond_distance_zero():
    model = tiny_lm(["mamba"], {"mamba": {"d_state": 4}}, ffn="swiglu")
    with torch.no_grad():
        for block in model.blocks:
            block.mixers[0].out_proj.weight.zero_()  # each block is x + ffn(norm(x)): per token
    result = memory_fidelity(model, token_ids(2, 6), num_probes=4)
    assert torch.equal(result.horizontal[:, 0], torch.ones(2, dtype=torch.float64))
    assert torch.equal(result.horizontal[:, 1:], torch.zeros(2, 5, dtype=torch.float64))
    assert torch.equal(result.vertical[:, 1:], torch.zeros(2, 5, dtype=torch.float64))
    assert (result.vertical[:, 0] > 0).all()


def test_a_width_3_convolution_forgets_exactly_after_3_tokens_per_layer():
    model = tiny_lm(["short_conv"], {"short_conv": {"kernel_size": 3}})
    result = memory_fidelity(model, token_ids(2, 9), num_probes=4)
    assert (result.horizontal[:, :3] > 0).all() and (result.horizontal[:, 3:] == 0).all()
    # Two stacked layers reach 2 * (3 - 1) = 4 tokens back.
    assert (result.vertical[1, :5] > 0).all() and (result.vertical[1, 5:] == 0).all()


@pytest.mark.parametrize(
    "pattern,options",
    [(["mamba"], {"mamba": {"d_state": 4}}), (["memmamba"], {"memmamba": MEMMAMBA})],
    ids=["mamba-L3-d8", "memmamba-L3-d8"],
)
def test_gaussian_probes_give_finite_metrics_of_the_documented_shape(pattern, options):
    model = tiny_lm(pattern, options, n_layers=3, dtype=torch.float32).train()
    result = memory_fidelity(model, token_ids(2, 10), max_distance=7, num_probes=2)
    assert result.horizontal.shape == result.vertical.shape == (3, 8)
    assert result.distances == list(range(8)) and result.layers == [pattern[0]] * 3
    assert torch.isfinite(result.horizontal).all() and torch.isfinite(result.vertical).all()
    ones = torch.ones(3, dtype=torch.float64)
    assert_close("horizontal at 0", ones, result.horizontal[:, 0], 1e-12)
    assert model.training  # the mode is restored


def test_bad_arguments_raise():
    model = tiny_lm(["mamba"], {"mamba": {"d_state": 4}})
    with pytest.raises(ValueError, match="max_distance must be an int in \\[0, T - 1 = 4\\]"):
        memory_fidelity(model, token_ids(1, 5), max_distance=5)
    with pytest.raises(ValueError, match="num_probes"):
        memory_fidelity(model, token_ids(1, 5), num_probes=0)
    with pytest.raises(ValueError, match="input_ids must be \\[N, T\\]"):
        memory_fidelity(model, token_ids(1, 5)[0])


def test_load_model_reads_a_trainer_checkpoint(tmp_path):
    from memzoo.train.checkpoint import save_checkpoint
    from memzoo.train.tokenizer import ByteTokenizer, save_tokenizer

    model = tiny_lm(["memmamba"], {"memmamba": MEMMAMBA}, dtype=torch.float32)
    save_checkpoint(
        tmp_path,
        10,
        model_state=model.state_dict(),
        train_state={},
        config={"model": model.config.to_dict()},
        write_tokenizer=lambda directory: save_tokenizer(ByteTokenizer(), directory),
        keep_last=1,
    )
    loaded, tokenizer = load_model(tmp_path)
    assert tokenizer.name == "byte"
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_cli_compares_two_checkpoints_in_one_json_and_plot(tmp_path, capsys):
    for name, pattern, options in (
        ("mamba", ["mamba"], {"mamba": {"d_state": 4}}),
        ("memmamba", ["memmamba"], {"memmamba": MEMMAMBA}),
    ):
        tiny_lm(pattern, options, dtype=torch.float32).save_pretrained(tmp_path / name)
    parser = argparse.ArgumentParser()
    add_fidelity_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "fidelity", "--checkpoint", str(tmp_path / "mamba"), "--checkpoint",
        str(tmp_path / "memmamba"), "--seq-len", "10", "--num-seqs", "2", "--probes", "2",
        "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert args.run(args) == 0
    record = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert sorted(record["models"]) == ["mamba", "memmamba"]
    assert len(record["models"]["memmamba"]["horizontal"][0]) == 10
    assert (tmp_path / "out" / "fidelity.png").stat().st_size > 0
    assert "memmamba: horizontal at delta 9" in capsys.readouterr().out
