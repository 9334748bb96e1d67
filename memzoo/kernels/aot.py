"""Compile every registered Triton kernel ahead of time for GPUs this machine lacks.

Each op's `triton.py` registers representative launches with `memzoo.kernels._core.register_aot`.
This module compiles each of them for sm_80 (A100) and sm_90 (H100) without a GPU, runs the
ptxas that ships with Triton on the PTX, and reports registers, spills and shared memory:

    python -m memzoo.kernels.aot                      # every kernel, sm_80 and sm_90
    python -m memzoo.kernels.aot --arch 90 --only chunk --keep /tmp/aot --json aot.json

The exit code is 0 only when every kernel compiled for every arch without spilling and within
the arch's shared memory; nothing registered is a failure too. Triton cannot compile under
its interpreter, so with TRITON_INTERPRET set `main` re-runs itself in a child process without it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memzoo.kernels._core import AotSpec, aot_specs, triton_status

# Shared memory one block may use after opting in (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_
# OPTIN, the limit Triton checks `metadata.shared` against at load time), in bytes:
# A100 163 KiB, RTX 30xx/A10/L4/L40 (sm_86/sm_89) 99 KiB, H100 227 KiB.
SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DEFAULT_ARCHS = (80, 90)

_USED_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.MULTILINE)


@dataclass
class AotResult:
    """What compiling one spec for one arch gave; `error` is set when it did not compile."""

    name: str
    arch: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def spill_bytes(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def over_shared_limit(self) -> bool:
        return self.shared is not None and not shared_memory_fits(self.shared, self.arch)

    @property
    def status(self) -> str:
        """One of ok, SPILL, SMEM, SPILL+SMEM, or "FAIL: <error type>: <its last line>"."""
        if self.error is not None:
            return f"FAIL: {self.error}"
        problems = []
        if self.spill_bytes > 0:
            problems.append("SPILL")
        if self.over_shared_limit:
            problems.append("SMEM")
        return "+".join(problems) or "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------
# Pure pieces: ptxas output and limits
# --------------------------------------------------------------------------------------


def parse_ptxas_report(text: str) -> dict[str, int]:
    """Registers and spill bytes from `ptxas -v` output.

    Returns {"registers", "spill_stores", "spill_loads"}: the most registers any function
    uses, and spills summed over the entry function and any non-inlined device functions.
    Raises ValueError when the text has no "Used N registers" line (not a ptxas -v report).
    """
    registers = [int(n) for n in _USED_REGISTERS.findall(text)]
    if not registers:
        raise ValueError(f"no 'Used N registers' line in ptxas output: {text.strip()[:200]!r}")
    spills = [(int(stores), int(loads)) for stores, loads in _SPILLS.findall(text)]
    return {
        "registers": max(registers),
        "spill_stores": sum(stores for stores, _ in spills),
        "spill_loads": sum(loads for _, loads in spills),
    }


def shared_memory_fits(shared: int, arch: int) -> bool:
    """True when `shared` bytes per block fit the arch's opt-in limit."""
    return shared <= SHARED_MEMORY_LIMITS[arch]


def ptx_target(ptx: str) -> str:
    """The `.target` of a PTX module, e.g. "sm_90a" (Triton adds the "a" from sm_90 on)."""
    match = _PTX_TARGET.search(ptx)
    if match is None:
        raise ValueError("PTX has no .target line")
    return match.group(1)


# --------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------


def jit_function(kernel: Any) -> Any:
    """The `triton.JITFunction` under `triton.autotune` / `triton.heuristics` wrappers."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            hint = (
                " (it was defined under TRITON_INTERPRET=1; compile in a process without it)"
                if type(fn).__name__ == "InterpretedFunction"
                else ""
            )
            raise TypeError(f"{type(kernel).__name__} does not wrap a triton.jit function{hint}")
        fn = fn.fn
    return fn


def _launch_signature(spec: AotSpec, fn: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """(signature, constexprs) covering every kernel argument, as Triton's own launcher builds.

    Constexpr arguments appear in the signature as "constexpr", like `JITFunction.run` does
    (triton 3.6 and 3.7 also accept them missing); a constexpr left out of the spec takes its
    default from the kernel's definition.
    """
    constexprs = dict(spec.constexprs)
    for param in fn.params:
        if param.is_constexpr and param.name not in constexprs and param.has_default:
            constexprs[param.name] = param.default
    missing = [n for n in fn.arg_names if n not in spec.signature and n not in constexprs]
    unknown = [n for n in (*spec.signature, *constexprs) if n not in fn.arg_names]
    if missing or unknown:
        raise ValueError(
            f"spec {spec.name!r} does not match {fn.__name__}({', '.join(fn.arg_names)}): "
            f"missing {missing}, unknown {unknown}"
        )
    signature = {n: spec.signature.get(n, "constexpr") for n in fn.arg_names}
    return signature, constexprs


def _launch_attributes(
    signature: dict[str, str], fn: Any, multiple_of_16: tuple[str, ...] = ()
) -> dict[tuple[int, ...], Any]:
    """Mark pointers 16-byte aligned, as Triton does at launch for torch tensors, and the
    integers in `multiple_of_16` divisible by 16, as it does for such values.

    Without it loads are not vectorized and the register counts are not those of real runs.
    """
    from triton.backends.compiler import BaseBackend

    return {
        (fn.arg_names.index(n),): BaseBackend.parse_attr("D")
        for n, ty in signature.items()
        if ty.startswith("*") or n in multiple_of_16
    }


def compile_spec(spec: AotSpec, arch: int) -> Any:
    """`triton.compile` one spec for `cuda:<arch>`; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = jit_function(spec.kernel)
    signature, constexprs = _launch_signature(spec, fn)
    source = triton.compiler.ASTSource(
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        attrs=_launch_attributes(signature, fn, spec.multiple_of_16),
    )
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def run_ptxas(ptx: str, arch: int, metadata: Any = None) -> str:
    """`ptxas -v` on `ptx` with the ptxas Triton ships; returns its report (stderr).

    The flags follow Triton 3.7's `make_cubin`, so the registers are those of the cubin it
    built. Triton 3.6 omits --regAllocOptLevel=2; with the ptxas 12.8 both ship, none of the
    48 builds we compared reported different registers or spills with and without it.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={ptx_target(ptx)}"]
    if metadata is not None and not metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    if metadata is not None and metadata.ptx_options:
        flags += metadata.ptx_options.split(" ")
    with tempfile.TemporaryDirectory(prefix="memzoo-aot-") as workdir:
        ptx_path = Path(workdir, "kernel.ptx")
        ptx_path.write_text(ptx)
        command = [
            get_ptxas(arch).path,
            *flags,
            str(ptx_path),
            "-o",
            str(ptx_path.with_suffix(".o")),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas exited {done.returncode}: {_last_line(done.stderr)}")
    return done.stderr + done.stdout


def check_spec(spec: AotSpec, arch: int, keep: Path | None = None) -> AotResult:
    """Compile `spec` for `arch` and assemble it with ptxas -v; errors become `AotResult.error`.

    `seconds` covers both steps (a kernel in Triton's cache compiles in well under a second).
    """
    result = AotResult(spec.name, arch)
    start = time.perf_counter()
    try:
        compiled = compile_spec(spec, arch)
        result.shared = compiled.metadata.shared
        report = parse_ptxas_report(run_ptxas(compiled.asm["ptx"], arch, compiled.metadata))
        result.registers = report["registers"]
        result.spill_stores = report["spill_stores"]
        result.spill_loads = report["spill_loads"]
        if keep is not None:
            _keep_binaries(compiled, keep / f"{_file_stem(spec.name)}.sm_{arch}")
    except Exception as error:  # a CompilationError, ptxas failing, a bad spec: report, go on
        result.error = f"{type(error).__name__}: {_last_line(str(error))}"
    result.seconds = time.perf_counter() - start
    return result


def check_specs(
    specs: Iterable[AotSpec], archs: Sequence[int], keep: Path | None = None
) -> list[AotResult]:
    """`check_spec` for every spec and arch, printing the table row by row as builds finish."""
    specs = list(specs)
    name_width = max(len("kernel"), *(len(spec.name) for spec in specs))
    print(format_header(name_width), flush=True)
    results = []
    for spec in specs:
        for arch in archs:
            results.append(check_spec(spec, arch, keep))
            print(format_row(results[-1], name_width), flush=True)
    return results


def _keep_binaries(compiled: Any, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".ptx").write_text(compiled.asm["ptx"])
    stem.with_name(stem.name + ".cubin").write_bytes(compiled.asm["cubin"])


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _last_line(text: str) -> str:
    """The last non-empty line: where Triton and ptxas put the actual complaint."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------

# (header, width, alignment); the kernel column is as wide as the longest spec name.
_COLUMNS = (("arch", 6, "<"), ("regs", 5, ">"), ("spill st+ld", 13, ">"), ("smem", 7, ">"))
_COLUMNS += (("limit", 7, ">"), ("sec", 6, ">"), ("status", 0, "<"))


def _cells(result: AotResult) -> tuple[str, ...]:
    def number(value: int | None) -> str:
        return "-" if value is None else str(value)

    spills = "-" if result.spill_stores is None else f"{result.spill_stores}+{result.spill_loads}"
    return (
        f"sm_{result.arch}",
        number(result.registers),
        spills,
        number(result.shared),
        str(SHARED_MEMORY_LIMITS[result.arch]),
        f"{result.seconds:.2f}",
        _shorten(result.status, 100),
    )


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _join(name: str, cells: Sequence[str], name_width: int) -> str:
    aligned = (f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, _COLUMNS, strict=True))
    return "  ".join([f"{name:<{name_width}}", *aligned]).rstrip()


def format_header(name_width: int = 24) -> str:
    return _join("kernel", [header for header, _, _ in _COLUMNS], name_width)


def format_row(result: AotResult, name_width: int = 24) -> str:
    """One table line: kernel, arch, registers, spill bytes, shared memory, seconds, status."""
    return _join(result.name, _cells(result), name_width)


def summarize(results: Sequence[AotResult]) -> str:
    """One line: how many builds passed, and what went wrong with the rest."""
    failed = sum(r.error is not None for r in results)
    spilled = sum(r.error is None and r.spill_bytes > 0 for r in results)
    over = sum(r.error is None and r.over_shared_limit for r in results)
    passed = sum(r.ok for r in results)
    return (
        f"{passed}/{len(results)} builds ok: {failed} failed to compile, {spilled} spill, "
        f"{over} over the shared-memory limit"
    )


def write_json(results: Sequence[AotResult], path: Path) -> None:
    """Write the results to `path` atomically (temp file in the same folder, then rename)."""
    import triton

    rows = [{**asdict(r), "status": r.status, "ok": r.ok} for r in results]
    payload = {"triton": triton.__version__, "shared_memory_limits": SHARED_MEMORY_LIMITS}
    payload["results"] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memzoo.kernels.aot",
        description="Compile every registered Triton kernel for GPUs this machine lacks.",
    )
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(DEFAULT_ARCHS),
        choices=sorted(SHARED_MEMORY_LIMITS),
        help="compute capabilities to compile for (default: 80 90)",
    )
    parser.add_argument("--only", metavar="SUBSTRING", help="only specs whose name contains this")
    parser.add_argument("--keep", metavar="DIR", type=Path, help="write each .ptx and .cubin here")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the table as JSON")
    return parser.parse_args(argv)


def _rerun_without_interpreter(argv: Sequence[str]) -> int:
    """Run `python -m memzoo.kernels.aot argv` with TRITON_INTERPRET removed; its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "memzoo.kernels.aot", *argv]
    return subprocess.run(command, env=env).returncode


def _ensure_writable_cache() -> None:
    """Point Triton's cache at a temp dir when its default one (~/.triton/cache) is not writable."""
    if "TRITON_CACHE_DIR" in os.environ:
        return
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    cache = os.path.join(home, ".triton", "cache")
    try:
        os.makedirs(cache, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        fallback = tempfile.mkdtemp(prefix="memzoo-aot-cache-")
        atexit.register(shutil.rmtree, fallback, ignore_errors=True)
        os.environ["TRITON_CACHE_DIR"] = fallback


def main(argv: Sequence[str] | None = None) -> int:
    """Compile, print the table and a summary; 0 only when every build is ok."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TRITON_INTERPRET" in os.environ:
        return _rerun_without_interpreter(argv)
    args = _parse_args(argv)
    importable, why = triton_status()
    if not importable:
        print(f"cannot compile Triton kernels: {why}")
        return 1
    _ensure_writable_cache()
    specs = [s for s in aot_specs() if args.only is None or args.only in s.name]
    if not specs:
        which = f" matching --only {args.only!r}" if args.only else ""
        print(f"no Triton kernels registered{which}: nothing was checked")
        return 1
    results = check_specs(specs, args.arch, args.keep)
    print(summarize(results))
    if args.json is not None:
        write_json(results, args.json)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
