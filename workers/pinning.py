"""GPU pinning: which devices a worker's engine may see."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def parse_gpus(gpus: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; None or ``""`` -> ``[]`` (CPU, or all devices)."""
    if not gpus:
        return []
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    for g in ids:
        if not (g.isdigit() or g.startswith(("GPU-", "MIG-"))):
            raise ValueError(f"--gpus: {g!r} is not a GPU index or UUID")
    return ids


def pin_gpus(gpus: list[str]) -> None:
    """Set CUDA_VISIBLE_DEVICES for this process; must run before anything touches CUDA."""
    if not gpus:
        return
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised before the worker pinned its GPUs")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    log.info("pinned to GPUs %s", os.environ["CUDA_VISIBLE_DEVICES"])
