"""The parts a test needs (redis-server, vLLM): skipped where missing locally, a failure in CI.

CI sets ``CI=true`` (``.ci/run`` does), so a missing or broken part can never turn a CI run's
engine tests into skips that look like a pass.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(what: str, ok: bool, why: str = "") -> None:
    """Fail in CI, skip elsewhere, unless ``ok``; works at module level too."""
    if ok:
        return
    detail = f" ({why})" if why else ""
    if CI:
        pytest.fail(f"{what} is required in CI{detail}", pytrace=False)
    pytest.skip(f"{what} is not available here{detail}", allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """Import ``name``; a missing or broken install is a failure in CI, a skip elsewhere."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # broken installs raise more than ImportError (torchvision's ops)
        require(name, False, f"{type(e).__name__}: {e}")
        raise  # unreachable: require() raised


def require_program(name: str) -> str:
    """The path of an executable on PATH."""
    path = shutil.which(name)
    require(name, path is not None)
    assert path is not None
    return path
