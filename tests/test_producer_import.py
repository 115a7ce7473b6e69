"""The producer side installs and imports without vLLM or torch."""

from __future__ import annotations

import json
import subprocess
import sys


def test_producer_import_pulls_neither_vllm_nor_torch() -> None:
    code = (
        "import json, sys, time; t = time.perf_counter(); "
        "from producer import generate, chat, app; from producer.client import generate_batch; "
        "print(json.dumps({'s': time.perf_counter() - t, "
        "'heavy': sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["heavy"] == []
    print(f"producer import took {report['s']:.3f}s")
