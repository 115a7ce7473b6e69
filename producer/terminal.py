"""Single keys from the terminal, read while a live view redraws (``fleet top``)."""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Waits up to the given seconds for keys; the keys typed meanwhile ('' when none).
KeyReader = Callable[[float], str]


@contextmanager
def keys() -> Iterator[KeyReader]:
    """Standard input in cbreak mode (each key at once, not echoed) until the block exits."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield _no_keys
        return
    saved = termios.tcgetattr(fd)
    # cbreak, not raw: Ctrl-C still raises KeyboardInterrupt, and output keeps its newlines.
    tty.setcbreak(fd)
    try:
        yield lambda timeout: _read(fd, timeout)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read(fd: int, timeout: float) -> str:
    ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not ready:
        return ""
    # select said readable, so this returns what is there without blocking.
    data = os.read(fd, 64)
    if not data:  # end of input: readable for good, so wait here instead of spinning
        time.sleep(max(timeout, 0.0))
    return data.decode(errors="replace")


def _no_keys(timeout: float) -> str:
    time.sleep(max(timeout, 0.0))
    return ""
