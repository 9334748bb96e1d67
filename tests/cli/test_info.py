"""`memzoo info` and `python -m memzoo info`."""

import subprocess
import sys

from memzoo.cli import main


def test_info_lists_versions_backends_and_ops(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("memzoo  0.1.0", "torch   2.", "triton  ", "backends", "cuda extension"):
        assert expected in out
    assert "causal_conv1d " in out and "causal_conv1d_update" in out
    assert "triton (interpreter)  yes" in out  # the test suite runs with TRITON_INTERPRET=1


def test_python_dash_m_works():
    result = subprocess.run(
        [sys.executable, "-m", "memzoo", "info"], capture_output=True, text=True, check=True
    )
    assert "ops" in result.stdout
