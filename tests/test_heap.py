"""The CLI's steady heap (heap.py): steps that free and re-allocate the same large blocks stop faulting
their pages in again. Each check runs in a subprocess: mallopt is process-wide and permanent."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# benchmarks/overhead.py's 10M-parameter MLP (42 MB of gradients, ~10,000 pages), trained for ten steps with
# a small Python list made after each backward: page faults per step over the last seven.
STEPS = """
import resource, sys, torch
from torch import nn
import torch.nn.functional as F
from gradcheck_cli.heap import steady_heap
steady = sys.argv[1] == "steady" and steady_heap()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                      nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
faults = []
for step in range(10):
    for p in model.parameters():
        p.grad = None
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(model(x), y).backward()
    kept = [float(i) for i in range(20)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(steady, sum(faults[3:]) / 7)
"""
GRADIENT_PAGES = 10_500_000 * 4 // 4096

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
    steady, faults = out.split()
    return steady, float(faults)


@glibc
def test_a_steady_heap_keeps_freed_blocks_without_faulting_them_in_again() -> None:
    steady, faults = _faults_per_step("steady")
    assert steady == "True"
    # glibc's own thresholds re-fault most of the gradients' pages every step here (~11,000 faults measured);
    # steady, the blocks come back from the heap
    assert faults < 0.1 * GRADIENT_PAGES


def test_steady_heap_declines_where_the_c_library_is_not_glibc(monkeypatch) -> None:
    from gradcheck_cli import heap

    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert heap.steady_heap() is False
