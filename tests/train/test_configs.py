"""Every shipped run config loads, and its model builds at the tiny sizes."""

from pathlib import Path

import pytest

from memzoo.models.lm import LM
from memzoo.train.config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    config = load_run_config(path)
    assert config.train.steps >= 1 and config.data.seq_len >= 1
    assert config.train.out_dir.startswith("runs/")
    if path.stem.endswith("-tiny"):
        assert LM(config.model).num_params() < 5_000_000


def test_overrides_apply_and_unknown_keys_fail(tmp_path):
    path = CONFIGS[0]
    config = load_run_config(path, ["train.lr=1e-3", "model.d_model=64", "data.varlen=true"])
    assert config.train.lr == 1e-3 and config.model.d_model == 64 and config.data.varlen
    with pytest.raises(ValueError, match="unknown key.*lrr"):
        load_run_config(path, ["train.lrr=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_run_config(path, ["lr=1"])
    with pytest.raises(TypeError, match="train.steps must be int"):
        load_run_config(path, ["train.steps=many"])
