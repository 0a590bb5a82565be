"""A CPU training process reuses freed large buffers instead of faulting fresh pages in every step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Runs in its own process: the setting is process-wide and would follow every later test here.
PROBE = textwrap.dedent(
    """
    import resource
    import torch
    from training.cpu_allocator import keep_freed_memory

    ELEMENTS = (96 << 20) // 4  # 96 MiB: above glibc's default mmap threshold (32 MiB at most)
    ROUNDS = 6

    def faults_reusing_a_freed_buffer():
        torch.ones(ELEMENTS)  # allocated, touched, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(ELEMENTS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # Steady state, as in a training loop: the heap takes a few rounds to grow to the buffers' size.
    default = [faults_reusing_a_freed_buffer() for _ in range(ROUNDS)][-1]
    assert keep_freed_memory()
    print(default, [faults_reusing_a_freed_buffer() for _ in range(ROUNDS)][-1])
    """
)
PAGE_FAULTS_OF_96_MIB = (96 << 20) // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_after_the_setting_a_freed_96_mib_buffer_is_reused_without_page_faults():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, kept = map(int, result.stdout.split())
    assert default >= PAGE_FAULTS_OF_96_MIB // 2  # glibc maps it afresh: every page faults again
    assert kept < PAGE_FAULTS_OF_96_MIB // 100
