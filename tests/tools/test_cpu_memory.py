"""keep_freed_memory: after it, repeated large temporaries come back from the heap instead of fresh pages.

The median over temporaries is compared: now and then one still gets fresh pages (small allocations of the
interpreter in between can leave the freed block unusable for the next one), most do not."""
import platform
import subprocess
import sys

import pytest

_SCRIPT = """
import resource, statistics, sys, torch
from vrwkv.tools.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm-up: the heap grows
    torch.empty(50 * 2**20 // 4).fill_(1.0)
per_temporary = []
for _ in range(9):  # a 50 MB temporary (above glibc's largest adaptive mmap threshold, 32 MB), written and freed
    f0 = faults()
    torch.empty(50 * 2**20 // 4).fill_(1.0)
    per_temporary.append(faults() - f0)
print(statistics.median(per_temporary))
"""


def _faults_per_temporary(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory sets glibc's malloc; elsewhere it returns False and has nothing to test")
def test_freed_memory_is_reused_instead_of_page_faulted_again():
    default = _faults_per_temporary("default")
    kept = _faults_per_temporary("keep")
    assert default > 10_000  # 50 MB / 4 KiB = 12,800 pages faulted in per temporary
    assert kept < 100
