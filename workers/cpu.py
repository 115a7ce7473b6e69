"""CPU-specific preparation of a worker process before the engine loads."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this whole process; True if granted.

    vLLM's CPU attention kernels use AMX tiles on the threads of its OpenMP pool. Linux grants
    the tile state per process on request; inside a Celery worker the request vLLM relies on
    never happens, and the first tile instruction dies with SIGILL. Asking once, from the main
    thread, before the engine loads, fixes that. A no-op off x86-64 Linux.
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        log.debug("AMX not granted: %s", os.strerror(ctypes.get_errno()))
        return False
    return True
