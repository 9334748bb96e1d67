"""Ahead-of-time compilation report (`python -m memzoo.kernels.aot`).

The ptxas samples are real `ptxas -v` output (ptxas 12.8, shipped with triton 3.7.1) for a
64x64 fp16 matmul, the same at 256x256 (which spills), and a kernel calling a noinline helper.
Compiling needs a process without TRITON_INTERPRET, so the end-to-end tests run a child Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memzoo.kernels.aot import (
    SHARED_MEMORY_LIMITS,
    AotResult,
    format_header,
    format_row,
    parse_ptxas_report,
    ptx_target,
    shared_memory_fits,
    summarize,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

PTXAS_CLEAN_SM90 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm_kernel' for 'sm_90a'
ptxas info    : Function properties for mm_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
ptxas info    : Compile time = 78.593 ms
"""

PTXAS_SPILL_SM90 = """\
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized \
due to insufficient register resources for the wgmma pipeline in the function 'mm_kernel'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm_kernel' for 'sm_90a'
ptxas info    : Function properties for mm_kernel
    4776 bytes stack frame, 8460 bytes spill stores, 6916 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4776 bytes cumulative stack size
ptxas info    : Compile time = 4244.033 ms
"""

PTXAS_SPILL_SM80 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm_kernel' for 'sm_80'
ptxas info    : Function properties for mm_kernel
    15376 bytes stack frame, 28714 bytes spill stores, 28004 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 15376 bytes cumulative stack size, \
408 bytes cmem[0]
ptxas info    : Compile time = 3939.687 ms
"""

PTXAS_WITH_DEVICE_FUNCTION = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'call_kernel' for 'sm_80'
ptxas info    : Function properties for call_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 392 bytes cmem[0]
ptxas info    : Compile time = 3.125 ms
ptxas info    : Function properties for kern3_$_helper__Pfp32_i32
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
"""


def test_parse_ptxas_report_reads_registers_of_a_clean_kernel():
    assert parse_ptxas_report(PTXAS_CLEAN_SM90) == {
        "registers": 168,
        "spill_stores": 0,
        "spill_loads": 0,
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        (PTXAS_SPILL_SM90, {"registers": 255, "spill_stores": 8460, "spill_loads": 6916}),
        (PTXAS_SPILL_SM80, {"registers": 32, "spill_stores": 28714, "spill_loads": 28004}),
    ],
    ids=["sm90-mm256", "sm80-mm256"],
)
def test_parse_ptxas_report_reads_spills(text, expected):
    assert parse_ptxas_report(text) == expected


def test_parse_ptxas_report_adds_spills_of_noinline_device_functions():
    # The helper's spill numbers are edited in (ptxas reported 0 for it): the sum is the point.
    report = parse_ptxas_report(PTXAS_WITH_DEVICE_FUNCTION)
    assert report == {"registers": 10, "spill_stores": 4, "spill_loads": 4}


def test_parse_ptxas_report_rejects_text_without_a_register_count():
    with pytest.raises(ValueError, match="Used N registers"):
        parse_ptxas_report("ptxas fatal   : Unresolved extern function 'foo'\n")


def test_ptx_target_keeps_the_arch_suffix():
    ptx = "//\n.version 8.7\n.target sm_90a\n.address_size 64\n"
    assert ptx_target(ptx) == "sm_90a"
    with pytest.raises(ValueError, match=".target"):
        ptx_target(".version 8.7\n")


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS), ids=lambda a: f"sm{a}")
def test_shared_memory_limit_is_inclusive(arch):
    limit = SHARED_MEMORY_LIMITS[arch]
    assert shared_memory_fits(limit, arch)
    assert not shared_memory_fits(limit + 1, arch)


def test_h100_allows_more_shared_memory_than_a100():
    assert SHARED_MEMORY_LIMITS[90] == 232448 > SHARED_MEMORY_LIMITS[80] == 166912


@pytest.mark.parametrize(
    "result, status",
    [
        (AotResult("k", 90, registers=40, spill_stores=0, spill_loads=0, shared=0), "ok"),
        (AotResult("k", 90, registers=255, spill_stores=8, spill_loads=0, shared=0), "SPILL"),
        (AotResult("k", 90, registers=40, spill_stores=0, spill_loads=0, shared=262144), "SMEM"),
        (
            AotResult("k", 80, registers=255, spill_stores=4, spill_loads=4, shared=200000),
            "SPILL+SMEM",
        ),
        (AotResult("k", 80, error="CompilationError: x is not defined"), "FAIL: CompilationError"),
    ],
    ids=["clean", "spill", "over-smem-sm90", "spill-and-smem-sm80", "compile-error"],
)
def test_status_flags_spills_shared_memory_and_failures(result, status):
    assert result.status.startswith(status)
    assert result.ok == (status == "ok")


def test_table_rows_line_up_and_summary_counts_each_problem():
    results = [
        AotResult("short", 80, registers=26, spill_stores=0, spill_loads=0, shared=0, seconds=0.1),
        AotResult("a_longer_name", 90, registers=255, spill_stores=8, spill_loads=8, shared=0),
        AotResult("bad", 90, error="CompilationError: NameError('x is not defined')"),
    ]
    lines = [format_header(13), *(format_row(r, 13) for r in results)]
    status_column = lines[0].index("status")
    assert [line[status_column:] for line in lines[1:]] == [
        "ok",
        "SPILL",
        "FAIL: CompilationError: NameError('x is not defined')",
    ]
    assert summarize(results) == (
        "1/3 builds ok: 1 failed to compile, 1 spill, 0 over the shared-memory limit"
    )


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "out" / "aot.json"
    path.parent.mkdir()
    path.write_text("stale")
    write_json([AotResult("k", 90, registers=40, spill_stores=0, spill_loads=0, shared=0)], path)
    payload = json.loads(path.read_text())
    assert payload["results"][0]["status"] == "ok"
    assert payload["results"][0]["registers"] == 40
    assert sorted(p.name for p in path.parent.iterdir()) == ["aot.json"]


# --------------------------------------------------------------------------------------
# End to end, in a child process without TRITON_INTERPRET
# --------------------------------------------------------------------------------------

COMPILE_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import triton
    import triton.language as tl

    from memzoo.kernels._core import AotSpec
    from memzoo.kernels.aot import check_spec


    # One program adds BLOCK elements of x and y (autotune-wrapped, to exercise unwrapping).
    @triton.autotune(configs=[triton.Config({"BLOCK": 256})], key=["n"])
    @triton.jit
    def add_kernel(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(o_ptr + offs, x + tl.load(y_ptr + offs, mask=mask), mask=mask)


    signature = {"x_ptr": "*fp16", "y_ptr": "*fp16", "o_ptr": "*fp16", "n": "i32"}
    spec = AotSpec("add-fp16-B256", add_kernel, signature, {"BLOCK": 256}, num_warps=4)
    result = check_spec(spec, int(sys.argv[1]))
    print(json.dumps({**result.__dict__, "status": result.status}))
    """
)


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, every run
    return env


def test_a_tiny_kernel_compiles_for_sm90_without_spilling(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "compile_add.py"
    script.write_text(COMPILE_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "90"],
        env=_child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None
    assert result["registers"] > 0
    assert result["spill_stores"] == result["spill_loads"] == 0
    assert result["shared"] <= SHARED_MEMORY_LIMITS[90]
    assert result["status"] == "ok"


def test_main_fails_when_no_kernel_matches(tmp_path):
    # Under TRITON_INTERPRET (set by the test setup) main re-runs itself in a child process;
    # either way, nothing to check is a failure.
    pytest.importorskip("triton")
    env = {**_child_env(tmp_path), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "memzoo.kernels.aot", "--only", "no-such-kernel"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "no Triton kernels registered matching --only 'no-such-kernel'" in done.stdout
