"""kdbench.allocator: glibc keeps large blocks for reuse once tuned (no page faults per allocation), nothing else
changes; the environment can leave glibc's settings alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from kdbench.allocator import tune_cpu_allocator, allocator_state
    if sys.argv[1] == "tune":
        tune_cpu_allocator()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 64 * 2**20 // 4  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    for _ in range(4):  # warm-up: the heap grows to its working size (its fresh pages are faulted in once)
        torch.ones(n).sum()
    before = faults()
    for _ in range(10):
        t = torch.ones(n)
        t.sum()
        del t
    print(allocator_state(), faults() - before)
""")


def _run(*args: str, env: dict | None = None) -> list[str]:
    import os

    e = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, "-c", _FAULTS, *args], capture_output=True, text=True, timeout=120, env=e)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@glibc
def test_tuned_allocator_reuses_large_blocks_without_page_faults():
    pages = 64 * 2**20 // 4096
    state, faults = _run("plain")
    assert state == "None" and int(faults) >= 9 * pages  # glibc: each of the 10 blocks is a fresh mmap
    state, faults = _run("tune")
    # the freed block is reused as it is (a few refaults allowed: the kernel may reclaim idle heap pages)
    assert state == "heap" and int(faults) <= 4 * pages


@glibc
def test_environment_leaves_glibc_alone():
    state, faults = _run("tune", env={"KDBENCH_CPU_MALLOC": "default"})
    assert state == "default" and int(faults) >= 9 * 64 * 2**20 // 4096


def test_tuning_is_once_per_process_and_recorded(monkeypatch):
    import kdbench.allocator as alloc

    monkeypatch.setattr(alloc, "_STATE", None)
    first = alloc.tune_cpu_allocator()
    assert alloc.allocator_state() == first and alloc.tune_cpu_allocator() == first
    if sys.platform.startswith("linux"):
        assert first == "heap"

    from kdbench.runner import environment

    assert environment()["cpu_allocator"] == first
