"""Actors the run builds (actors/driver/build.py::_group) keep freed memory mapped (placement.retain_freed_mib,
eopd_ray/placement.py::allocator_env): a block that a phase allocates again every step is page-faulted in once,
not at every step. Measured with the kernel's minor-fault count inside a real Ray actor."""

from __future__ import annotations

import platform
import sys

import pytest
import ray

from actors.driver.build import _group
from eopd_ray.config import load_config

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="the allocator settings are glibc's; the fault counts are Linux's")]

BLOCK_MIB = 64  # above glibc's largest default mmap threshold (32 MiB on 64-bit): mapped anew at every allocation
PAGES = BLOCK_MIB * (1 << 20) // 4096


class FaultProbe:
    """Stands in for a phase: takes a block from the C allocator (the one torch's CPU tensors come from), writes
    every page, frees it; counts the minor faults. The C allocator itself, so that no tensor bookkeeping placed
    between the blocks can move them (that would be the allocator's placement under test, not its settings)."""

    def __init__(self):
        pass

    def faults_per_step(self, steps: int = 6) -> list[int]:
        import ctypes
        import resource

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        counts = []
        for _ in range(steps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(BLOCK_MIB << 20)
            ctypes.memset(block, 1, BLOCK_MIB << 20)
            libc.free(block)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return counts


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe travels whole to its actor
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _steady_faults(retain_mib: int) -> list[int]:
    """Minor faults of steps 2.. (step 1 maps the block the first time) in a teacher actor built by the run."""
    cfg = load_config(None, [f"placement.retain_freed_mib={retain_mib}"])
    group = _group(cfg, "teacher", ray.remote(FaultProbe), 1, lambda rank: {}, num_cpus=1)
    try:
        counts = ray.get(group.actors[0].faults_per_step.remote())
    finally:
        group.shutdown()
    return counts[1:]


def test_actors_keep_freed_blocks_and_glibc_defaults_fault_them_again(local_ray):
    kept = max(_steady_faults(1024))  # every step, not just most
    default = min(_steady_faults(0))
    assert default > PAGES // 2, f"glibc defaults: {default} faults for {PAGES} pages; expected about one per page"
    assert kept < PAGES // 20, f"retain_freed_mib=1024: {kept} faults for {PAGES} pages; expected nearly none"
