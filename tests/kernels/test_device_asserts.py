"""Bad tensor values are refused on every device, each by the check that costs no host sync there.

On CPU the checks read the values and raise ValueError. On a GPU they are `torch._assert_async`
calls: the stream fails with a device-side assert naming the argument, and the process's CUDA
context is lost. So each case runs in a fresh interpreter on `TEST_DEVICE`, and the test reads
the message from its output. One case per kind of check: the shared cu_seqlens check, an op's
own value check (selective_scan's A), MoM's routing checks and MemMamba's note counts. The other
bad-value cases (marked `device_assert`) run in-process on CPU only.
"""

import subprocess
import sys

import pytest

from memzoo.kernels.testing import TEST_DEVICE

CASES = {
    "cu_seqlens-decreasing": (
        "from memzoo.kernels import causal_conv1d\n"
        "causal_conv1d(torch.randn(1, 8, 4), torch.randn(4, 3),\n"
        "              cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))",
        "cu_seqlens must be non-decreasing",
    ),
    "selective_scan-A-positive": (
        "from memzoo.kernels import selective_scan\n"
        "x = torch.randn(1, 8, 4)\n"
        "selective_scan(x, x.abs(), torch.ones(4, 2), torch.randn(1, 8, 1, 2),\n"
        "               torch.randn(1, 8, 1, 2))",
        "A must be negative",
    ),
    "mom-indices-out-of-range": (
        "from memzoo.kernels.mom import group_by_memory\n"
        "group_by_memory(torch.tensor([[[0], [3]]]), 2)",
        "indices must lie in [0, num_memories=2)",
    ),
    "memmamba-counts-jump": (
        "from memzoo.kernels.memmamba import note_attention\n"
        "q = torch.randn(1, 4, 1, 8)\n"
        "note_attention(q, q, q, torch.tensor([[0, 2, 2, 2]], dtype=torch.int32), 2)",
        "counts must grow by 0 or 1",
    ),
}

PRELUDE = "import torch\ntorch.set_default_device({device!r})\n"
# A GPU reports the assert at the next synchronisation.
EPILOGUE = "\nif torch.cuda.is_available():\n    torch.cuda.synchronize()\nprint('no error')\n"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_value_fails_the_call_naming_the_argument(name):
    code, message = CASES[name]
    script = PRELUDE.format(device=str(TEST_DEVICE)) + code + EPILOGUE
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "no error" not in output
    assert message in output, output
    refusal = "ValueError" if TEST_DEVICE.type == "cpu" else "device-side assert"
    assert refusal in output, output
