"""The first-GPU-run check (benchmarks/gpu_check.py) runs its CPU-possible checks here.

Its checks start real workers with the real vLLM engine and the tiny model; on a machine
without NVIDIA GPUs the checks that need one must say so (SKIP), never pass.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import project_env

pytestmark = pytest.mark.engine


def test_the_gpu_check_passes_what_a_cpu_can_show() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-only", "--skip", "throughput",
         "--idle-rounds", "2"],
        env=project_env(), capture_output=True, text=True, timeout=900)
    lines = {line.split()[1]: line for line in run.stdout.splitlines()
             if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"], ["INFO"])}
    print(run.stdout, run.stderr[-3000:])  # shown when the test fails
    assert run.returncode == 0, run.stdout
    assert lines["versions"].startswith("PASS"), lines["versions"]
    for needs_gpu in ("pinning", "tensor-parallel"):
        assert lines[needs_gpu].startswith("SKIP") and "NVIDIA" in lines[needs_gpu]
    for check in ("sigkill", "idle-unload", "core-death"):
        assert lines[check].startswith("PASS"), lines[check]
    assert "unloaded" in lines["idle-unload"] and "exited" in lines["core-death"]
