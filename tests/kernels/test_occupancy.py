"""Programs a multiprocessor holds at once, from a compiled kernel's registers and shared memory."""

from types import SimpleNamespace

import pytest
import torch

from memzoo.kernels._occupancy import _limits, programs_per_sm, resident_programs

# An H100/H200 multiprocessor: 65536 registers, 2048 threads, 228 KiB of shared memory.
HOPPER = (65536, 2048, 228 * 1024, 132)


@pytest.mark.parametrize(
    "registers, warps, shared, expected",
    [
        # "Block Limit Registers" as Nsight Compute reported it on an H200 for these kernels:
        (91, 4, 1024, 5),  # the selective scan's forward (Triton 3.6)
        (43, 4, 512, 10),  # the skip-and-gate forward
        (72, 4, 4096, 7),  # the skip-and-gate backward
        (223, 8, 4096, 1),  # the selective scan's backward
        (64, 4, 512, 8),  # the forward as Triton 3.7 compiles it
        (255, 8, 0, 1),
        (16, 4, 0, 16),  # threads, not registers, bound it: 2048 / 128
        (32, 4, 100 * 1024, 2),  # shared memory bounds it
        (255, 32, 0, 1),  # never below one
    ],
)
def test_programs_per_sm(registers, warps, shared, expected):
    assert programs_per_sm(registers, warps, shared, HOPPER) == expected


def test_a_kernel_without_a_register_count_counts_as_one_program():
    """Where a Triton's compiled kernel keeps no `n_regs`, the launch is sized as for one
    program a multiprocessor (never more than one wave), with a warning, once per launch."""
    calls = []

    class Compiled:
        metadata = SimpleNamespace(shared=0)

        def _init_handles(self):
            calls.append("loaded")

    class Kernel:
        params = []

        def warmup(self, *args, grid, **kwargs):
            return Compiled()

    kernel = Kernel()
    device = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="cannot read the registers"):
        assert resident_programs(kernel, (), {"num_warps": 4}, device) == 1
    assert resident_programs(kernel, (), {"num_warps": 4}, device) == 1  # cached, no warning
    assert calls == ["loaded"]


@pytest.mark.gpu
def test_resident_programs_reads_the_compiled_kernel():
    """On the installed Triton: the selective scan's forward main pass, compiled for this GPU,
    gives the count its own registers give, and asking again finds it cached."""
    from memzoo.kernels.selective_scan import triton as scan_triton

    R, Dm, N = 64, 32, 16
    f32 = {"device": "cuda", "dtype": torch.float32}
    u, delta, y = (torch.zeros(R, Dm, **f32) for _ in range(3))
    A, B, C = -torch.ones(Dm, N, **f32), torch.zeros(R, 1, N, **f32), torch.zeros(R, 1, N, **f32)
    states = torch.zeros(4, Dm, N, **f32)
    cu = torch.tensor([0, R], device="cuda", dtype=torch.int32)
    args = (u, delta, A, B, C, states, y, states, states, cu, cu, cu, cu)
    kwargs = {
        "Dm": Dm,
        "G": 1,
        "NS": N,
        "SEG": 256,
        "num_warps": 4,
        "BT": 8,
        "BD": 16,
        "BN": 16,
        "HAS_H0": False,
        "STORE_FINAL": False,
        "STORE_TILES": True,
        "SEGMENTED": True,
    }
    count = resident_programs(scan_triton._fwd_kernel, args, kwargs, u.device)
    compiled = scan_triton._fwd_kernel.warmup(*args, grid=(1,), **kwargs)
    shared = compiled.metadata.shared
    assert count == programs_per_sm(compiled.n_regs, 4, shared, _limits(u.device.index or 0))
    assert 1 <= count <= 16
    assert resident_programs(scan_triton._fwd_kernel, args, kwargs, u.device) == count
