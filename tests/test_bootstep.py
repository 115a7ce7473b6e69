"""How a fleet worker refuses to start wrong (a real `celery worker` process, no Redis needed:
it stops before it connects)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_vllm_starts_its_processes_with_spawn_unless_the_operator_chose() -> None:
    from workers.bootstep import vllm_environment

    assert vllm_environment(False, {}) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                           "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    chosen = vllm_environment(True, {"VLLM_WORKER_MULTIPROC_METHOD": "forkserver"})
    assert chosen == {"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                      "VLLM_WORKER_MULTIPROC_METHOD": "forkserver"}


def test_celerys_default_prefork_pool_is_refused_with_a_clear_error() -> None:
    # Its forked children would run the task bodies without the worker's engine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_BROKER_URL="redis://127.0.0.1:1/0",  # never reached
               FLEET_MODELS='{"fake": {"model": "unused", "engine": "fake"}}')
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--model", "fake",
         "-l", "WARNING"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "prefork pool runs tasks in forked children" in done.stderr
    assert "-P threads" in done.stderr
