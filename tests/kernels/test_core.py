"""Backend resolution, input checks, registries and the interpreter autotune helper."""

import subprocess
import sys

import pytest
import torch

from memzoo.kernels import _core
from memzoo.kernels._core import BackendUnavailableError, InputCheck, resolve_backend

CPU = torch.device("cpu")


def test_auto_on_cpu_is_torch():
    assert resolve_backend("op", "auto", CPU, torch.float32) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", "triton", CPU, torch.float16) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="op: backend='triton' got cpu tensors"):
        resolve_backend("op", "triton", CPU)


def test_cuda_backend_on_cpu_explains(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="op: backend='cuda' needs CUDA tensors"):
        resolve_backend("op", "cuda", CPU)


def test_auto_on_cuda_prefers_extension_then_triton(monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_backend("op", "auto", cuda, torch.bfloat16) == "triton"
    assert resolve_backend("op", "auto", cuda, torch.float64) == "torch"
    monkeypatch.setattr(_core, "cuda_extension_ops", lambda: frozenset({"op"}))
    assert resolve_backend("op", "auto", cuda, torch.bfloat16) == "cuda"
    assert resolve_backend("other", "auto", cuda, torch.bfloat16) == "triton"


def test_missing_triton_is_explained(monkeypatch):
    monkeypatch.setattr(_core, "triton_status", lambda: (False, "triton is not importable: no"))
    with pytest.raises(BackendUnavailableError, match="triton is not importable"):
        resolve_backend("op", "triton", CPU)
    assert resolve_backend("op", "auto", torch.device("cuda"), torch.float16) == "torch"


def test_extension_status_says_why_it_is_absent():
    available, why = _core.cuda_extension_status()
    if torch.version.cuda is None:
        assert not available and "CPU build" in why
    elif not available:
        assert "memzoo._C is not built" in why and "--no-build-isolation" in why


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"op: backend must be one of .* got 'tpu'"):
        resolve_backend("op", "tpu", CPU)


def test_input_check_records_and_compares_named_dims():
    check = InputCheck("op")
    check.tensor("q", torch.zeros(2, 5, 3, 8), "B T H D")
    check.tensor("v", torch.zeros(2, 5, 3, 4), "B T H V")
    assert check.sizes == {"B": 2, "T": 5, "H": 3, "D": 8, "V": 4}
    with pytest.raises(
        ValueError, match=r"op: k must have shape \[B=2, T=5, H=3, D=8\] \(D=8 from q\)"
    ):
        check.tensor("k", torch.zeros(2, 5, 3, 7), "B T H D")


def test_input_check_returns_contiguous_copies():
    x = torch.arange(12.0).reshape(3, 4).t()
    out = InputCheck("op").tensor("x", x, "A B")
    assert out.is_contiguous() and torch.equal(out, x)


def test_input_check_dtypes_and_types():
    check = InputCheck("op")
    with pytest.raises(TypeError, match=r"op: x must have dtype in \['torch.float16'\]"):
        check.tensor("x", torch.zeros(2), "N", dtypes=[torch.float16])
    with pytest.raises(TypeError, match="op: idx must be a floating-point tensor"):
        check.tensor("idx", torch.zeros(2, dtype=torch.int32), "N")
    assert (
        check.tensor("idx", torch.zeros(2, dtype=torch.int32), "N", floating=False).dtype
        == torch.int32
    )
    assert check.optional("bias", None, "N") is None


@pytest.mark.cpu
def test_input_check_devices():
    check = InputCheck("op")
    check.tensor("x", torch.zeros(2), "N")
    with pytest.raises(ValueError, match="op: y is on meta but x is on cpu"):
        check.tensor("y", torch.zeros(2, device="meta"), "N")


def test_cu_seqlens_allows_empty_sequences():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert torch.equal(InputCheck("op").cu_seqlens(cu, total=7, batch=1), cu)


def test_registered_ops_lists_conv1d():
    names = {op.name: op.backends for op in _core.registered_ops()}
    assert names["causal_conv1d"] == ("torch", "triton")
    assert "causal_conv1d_update" in names


def test_aot_specs_cover_every_conv1d_kernel():
    kernels = {spec.name.split("-")[0] for spec in _core.aot_specs()}
    assert {"conv1d_fwd", "conv1d_fwd_grad", "conv1d_bwd", "conv1d_final_state"} <= kernels
    assert {"conv1d_dinit", "conv1d_update"} <= kernels


def test_aot_specs_find_every_triton_module():
    modules = {spec.kernel.fn.__module__ for spec in _core.aot_specs()}
    assert {
        "memzoo.kernels.conv1d.triton",
        "memzoo.kernels.linear_attn.triton",
        "memzoo.kernels.linear_attn.based_triton",
    } <= modules


def test_importing_memzoo_does_not_import_triton():
    """Triton is optional (Linux only) and must be imported only when a kernel runs."""
    code = "import sys, memzoo.kernels, memzoo.cli; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.cpu
def test_autotune_runs_under_the_interpreter():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]

    @_core.autotune(configs, key=["n"])
    @triton.jit
    def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, 2 * tl.load(x_ptr + offsets, mask=mask), mask=mask)

    x = torch.arange(40.0)
    y = torch.zeros(40)
    double[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40)
    assert torch.equal(y, 2 * x)
    assert double.best_config.kwargs["BLOCK"] == 16
