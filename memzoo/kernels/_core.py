"""Shared kernel infrastructure: backend choice, input checks, op and AOT registries.

Every op in `memzoo.kernels` goes through three steps here:

1. `InputCheck` validates the user's tensors (shapes by named dims, dtypes, devices,
   cu_seqlens) and raises ValueError/TypeError that name the argument and what was expected.
2. `resolve_backend` turns `backend="auto" | "torch" | "triton" | "cuda"` into the backend
   that will run, or raises `BackendUnavailableError` saying why it cannot.
3. The op's Triton module registers representative launch signatures with `register_aot`,
   so `python -m memzoo.kernels.aot` can compile every kernel for GPUs this machine lacks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# Dtypes the Triton kernels accept; everything accumulates in fp32 regardless.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


# --------------------------------------------------------------------------------------
# What this machine can run
# --------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for the tl.dot calls of a kernel whose inputs are `dtype`.

    fp32 inputs get exact fp32 products ("ieee") under torch's default
    `torch.get_float32_matmul_precision() == "highest"`, and TF32 once the user allows it
    (`torch.set_float32_matmul_precision("high")`), as torch's own fp32 matmuls do. Half
    precision inputs keep TF32 for their fp32 intermediates (state reads), where it costs
    nothing that the inputs' own rounding has not already cost.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET is set, so Triton kernels may run on CPU tensors.

    Triton reads the variable when a kernel is defined: set it before the first memzoo
    kernel module is imported (tests do so in conftest.py).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import triton
    except Exception as error:  # ImportError, or a broken install raising something else
        return False, f"triton is not importable: {error}"
    return True, triton.__version__


def _load_cuda_extension() -> tuple[Any, str]:
    """(memzoo._C or None, a short description or the reason it is absent)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build, so the extension is never built"
    try:
        return importlib.import_module("memzoo._C"), "memzoo._C"
    except ImportError as error:
        return None, (
            f"memzoo._C is not built ({error}); "
            "install with `pip install --no-build-isolation -e .` on a CUDA machine"
        )


# Looked up once, at import: backend resolution runs inside torch.compile'd code, where an
# import cannot be traced (it would break the graph on every CUDA call).
_EXTENSION, _EXTENSION_STATUS = _load_cuda_extension()
_EXTENSION_OPS = frozenset(getattr(_EXTENSION, "OPS", ()))


def cuda_extension_status() -> tuple[bool, str]:
    """(importable, a short description or the reason it is not) for memzoo._C."""
    return _EXTENSION is not None, _EXTENSION_STATUS


def cuda_extension_ops() -> frozenset[str]:
    """Names of the ops the built CUDA extension implements (empty when not built)."""
    return _EXTENSION_OPS


def resolve_backend(
    op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None
) -> str:
    """Choose the backend that runs `op` on tensors of `device` / `dtype`.

    auto: CUDA tensors -> the CUDA extension if it implements `op`, else Triton, else torch;
          CPU tensors -> torch (the Triton interpreter is opt-in: ask for backend="triton").
    torch: always available. triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    cuda: CUDA tensors with memzoo._C built and implementing `op`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if not on_cuda:
            return "torch"
        if op in cuda_extension_ops():
            return "cuda"
        if triton_status()[0] and (dtype is None or dtype in TRITON_DTYPES):
            return "triton"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        available, why = triton_status()
        if not available:
            raise BackendUnavailableError(f"{op}: backend='triton' is unavailable: {why}")
        if not on_cuda and not (device.type == "cpu" and interpreter_enabled()):
            raise BackendUnavailableError(
                f"{op}: backend='triton' got {device.type} tensors; Triton kernels run on CUDA "
                "tensors, or on CPU tensors through the interpreter (set TRITON_INTERPRET=1 "
                "before importing memzoo)"
            )
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise BackendUnavailableError(
                f"{op}: backend='triton' supports float16, bfloat16 and float32, got {dtype}; "
                "use backend='torch'"
            )
        return "triton"
    if not on_cuda:
        raise BackendUnavailableError(f"{op}: backend='cuda' needs CUDA tensors, got {device}")
    available, why = cuda_extension_status()
    if not available:
        raise BackendUnavailableError(f"{op}: backend='cuda' is unavailable: {why}")
    if op not in cuda_extension_ops():
        raise BackendUnavailableError(f"{op}: the CUDA extension has no kernel for this op")
    return "cuda"


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


class InputCheck:
    """Validates the tensors of one op call against named dimensions.

    >>> check = InputCheck("causal_conv1d")
    >>> x = check.tensor("x", x, "B T D")            # records B, T, D
    >>> weight = check.tensor("weight", weight, "D W")  # D must match x
    >>> check.sizes["W"]

    Sizes can be pinned before a check (`check.sizes["S"] = W - 1`) with an explanation in
    `check.origin["S"]`. Tensors come back contiguous (copied if needed), and every tensor
    must share the first tensor's device.
    """

    def __init__(self, op: str):
        self.op = op
        self.sizes: dict[str, int] = {}
        self.origin: dict[str, str] = {}
        self.device: torch.device | None = None
        self._device_owner = ""

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.op}: {message}")

    @staticmethod
    def on_host(t: torch.Tensor) -> bool:
        """Whether a check may read t's values on the host (and raise ValueError): on CPU, but
        not under torch.compile, where a read breaks the graph. Elsewhere checks are async
        asserts (torch._assert_async), which neither sync a GPU nor break a graph."""
        return t.device.type == "cpu" and not torch.compiler.is_compiling()

    def tensor(
        self,
        name: str,
        t: Any,
        dims: str,
        *,
        floating: bool = True,
        dtypes: Sequence[torch.dtype] | None = None,
    ) -> torch.Tensor:
        """Check `t` against `dims` (names such as "B T H D"); return it contiguous."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        names = dims.split()
        if t.dim() != len(names):
            raise self.error(
                f"{name} must have {len(names)} dims [{', '.join(names)}], "
                f"got shape {tuple(t.shape)}"
            )
        for dim_name, size in zip(names, t.shape, strict=True):
            if dim_name not in self.sizes:
                self.sizes[dim_name] = size
                self.origin[dim_name] = f"from {name}"
            elif self.sizes[dim_name] != size:
                expected = ", ".join(
                    f"{n}={self.sizes[n]}" if n in self.sizes else n for n in names
                )
                raise self.error(
                    f"{name} must have shape [{expected}] ({dim_name}={self.sizes[dim_name]} "
                    f"{self.origin[dim_name]}), got {tuple(t.shape)}"
                )
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(
                f"{self.op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}"
            )
        if floating and not t.is_floating_point():
            raise TypeError(f"{self.op}: {name} must be a floating-point tensor, got {t.dtype}")
        self._check_device(name, t)
        return t.contiguous()

    def optional(self, name: str, t: Any, dims: str, **kwargs: Any) -> torch.Tensor | None:
        return None if t is None else self.tensor(name, t, dims, **kwargs)

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        if self.device is None:
            self.device, self._device_owner = t.device, name
        elif t.device != self.device:
            raise self.error(
                f"{name} is on {t.device} but {self._device_owner} is on {self.device}; "
                "move all inputs to one device"
            )

    def cu_seqlens(
        self, cu_seqlens: Any, total: int, batch: int, length_name: str = "T"
    ) -> torch.Tensor:
        """Check packed sequence offsets: int32 `[N + 1]`, 0 first, non-decreasing, `total` last.

        Empty sequences are allowed (routing may leave a memory without tokens). The values are
        checked eagerly on CPU; on CUDA with `torch._assert_async`, which fails the stream
        instead of synchronising with the host.
        """
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(
                f"{self.op}: cu_seqlens must be an int32 torch.Tensor, "
                f"got {type(cu_seqlens).__name__}"
            )
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"{self.op}: cu_seqlens must have dtype int32, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise self.error(
                "cu_seqlens must be 1-D with N + 1 >= 2 entries, "
                f"got shape {tuple(cu_seqlens.shape)}"
            )
        if batch != 1:
            raise self.error(
                "with cu_seqlens the batch size must be 1 (sequences packed along time), "
                f"got B={batch}"
            )
        self._check_device("cu_seqlens", cu_seqlens)
        cu_seqlens = cu_seqlens.contiguous()
        first, last = cu_seqlens[0], cu_seqlens[-1]
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        if self.on_host(cu_seqlens):
            if int(first) != 0:
                raise self.error(f"cu_seqlens must start at 0, got {int(first)}")
            if bool((steps < 0).any()):
                bad = int(torch.nonzero(steps < 0)[0])
                raise self.error(
                    f"cu_seqlens must be non-decreasing, got {cu_seqlens[bad].item()} then "
                    f"{cu_seqlens[bad + 1].item()} at index {bad}"
                )
            if int(last) != total:
                raise self.error(
                    f"cu_seqlens must end at the packed length {length_name}={total}, "
                    f"got {int(last)}"
                )
        else:
            torch._assert_async(first == 0, f"{self.op}: cu_seqlens must start at 0")
            torch._assert_async((steps >= 0).all(), f"{self.op}: cu_seqlens must be non-decreasing")
            torch._assert_async(
                last == total, f"{self.op}: cu_seqlens must end at {length_name}={total}"
            )
        return cu_seqlens


@functools.cache
def eager_under_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, run eagerly under torch.compile (a graph break; see `memzoo.kernels`): for the
    torch paths built on hand-written autograd.Functions, whose in-place workspaces and strided
    gradients dynamo does not capture faithfully. Wrapped on first use, not at import:
    torch.compiler.disable imports dynamo, and dynamo imports Triton."""
    return torch.compiler.disable(fn)


def check_choice(op: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


# --------------------------------------------------------------------------------------
# Registries: public ops (for `memzoo info`) and AOT launch signatures (for aot.py)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpInfo:
    """A public op and the backends that implement it."""

    name: str
    fn: Callable[..., Any]
    backends: tuple[str, ...]


@dataclass(frozen=True)
class AotSpec:
    """One representative launch of a Triton kernel, compiled ahead of time by aot.py.

    `signature` maps every non-constexpr argument to a Triton type ("*fp32", "i32", ...);
    `constexprs` gives every constexpr argument a value. `multiple_of_16` names integer
    arguments to compile as multiples of 16, as Triton specializes them at launch when they
    are (e.g. a model width), which lets it vectorize loads.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    multiple_of_16: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3  # Triton's CUDA default, what launches get unless they say otherwise


_OPS: dict[str, OpInfo] = {}
_AOT: dict[str, AotSpec] = {}


def register_op(*backends: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator listing a public op (under its function name) with its backends."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _OPS[fn.__name__] = OpInfo(fn.__name__, fn, tuple(backends))
        return fn

    return wrap


def registered_ops() -> list[OpInfo]:
    """All public ops, sorted by name (imports memzoo.kernels so every op is registered)."""
    importlib.import_module("memzoo.kernels")
    return sorted(_OPS.values(), key=lambda info: info.name)


def aot_signature(kernel: Any, constexprs: dict[str, Any], types: dict[str, str]) -> dict[str, str]:
    """Triton types of `kernel`'s non-constexpr arguments: `types[name]` where given, else
    "*fp32" for pointers (names ending in `_ptr`) and "i32" for the rest."""
    parameters = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    return {
        name: types.get(name, "*fp32" if name.endswith("_ptr") else "i32")
        for name, parameter in parameters.items()
        if name not in constexprs and not _is_constexpr(parameter)
    }


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    """Whether a kernel argument is annotated `tl.constexpr` (as a string or the object)."""
    annotation = parameter.annotation
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


def register_aot(spec: AotSpec) -> None:
    if spec.name in _AOT:
        raise ValueError(f"AOT spec {spec.name!r} is registered twice")
    parameters = inspect.signature(getattr(spec.kernel, "fn", spec.kernel)).parameters
    if "DOT" in parameters and "DOT" not in spec.constexprs:
        # The dot precision every tl.dot kernel takes: AOT launches are bf16, so TF32.
        spec = replace(spec, constexprs={**spec.constexprs, "DOT": dot_precision(torch.bfloat16)})
    _AOT[spec.name] = spec


def aot_specs() -> list[AotSpec]:
    """Every registered AOT spec, after importing the Triton modules of every op
    (`memzoo/kernels/<op>/triton.py` and `<op>/*_triton.py`)."""
    import memzoo.kernels as kernels

    for package in pkgutil.iter_modules(kernels.__path__, "memzoo.kernels."):
        if not package.ispkg:
            continue
        path = importlib.import_module(package.name).__path__
        for module in pkgutil.iter_modules(path, package.name + "."):
            leaf = module.name.rsplit(".", 1)[1]
            if leaf == "triton" or leaf.endswith("_triton"):
                importlib.import_module(module.name)
    return list(_AOT.values())


# --------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------


def _bench_first_config(fn: Callable[[], Any], quantiles: Any = None, **_: Any) -> list[float]:
    # Every config "takes" the same time, so the autotuner keeps the first one. Nothing runs:
    # under the interpreter a benchmark would only cost time.
    return [0.0, 0.0, 0.0]


def autotune(configs: list[Any], key: list[str], **kwargs: Any) -> Callable[[Any], Any]:
    """`triton.autotune` that also works under the interpreter (first config wins there)."""
    import triton

    if interpreter_enabled():
        kwargs.setdefault("do_bench", _bench_first_config)
    return triton.autotune(configs=configs, key=key, **kwargs)
