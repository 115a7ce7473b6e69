"""What ``fleet batch run`` shows: its progress while it runs, its summary at the end.

On a terminal a rich progress bar (done of total, failed, requests/s, tokens/s, elapsed, ETA);
otherwise one plain line every ``PLAIN_EVERY_S`` seconds, as a log reader wants it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from producer.gateway.batchfile import Summary

#: Seconds between two progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 10.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def figures(s: Summary) -> dict[str, Any]:
    """Done, failed, rates and ETA of a run so far."""
    elapsed = max(s.wall_s, 1e-9)
    ran = s.succeeded + sum(s.failed.values())
    rate = ran / elapsed
    left = max(0, s.total - s.done)
    return {"done": s.done, "total": s.total, "failed": sum(s.failed.values()),
            "requests_per_s": rate, "tokens_per_s": s.completion_tokens / elapsed,
            "elapsed": _clock(s.wall_s), "eta": _clock(left / rate) if rate > 0 else "-"}


def plain_line(s: Summary) -> str:
    f = figures(s)
    return (f"batch: {f['done']}/{f['total']} done, {f['failed']} failed, "
            f"{f['requests_per_s']:.1f} req/s, {f['tokens_per_s']:.0f} tok/s, "
            f"elapsed {f['elapsed']}, ETA {f['eta']}")


class ProgressView:
    """A callable for ``run_batch(on_progress=...)``, used as a context manager."""

    def __init__(self, stream: TextIO | None = None, terminal: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[line]}"),
                console=Console(file=self.stream), transient=False)
            self._task = self._progress.add_task("batch", total=None, line="")
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, s: Summary) -> None:
        if self._progress is not None:
            f = figures(s)
            self._progress.update(
                self._task, total=s.total, completed=s.done,
                line=f"{f['failed']} failed  {f['requests_per_s']:.1f} req/s  "
                     f"{f['tokens_per_s']:.0f} tok/s  {f['elapsed']}  ETA {f['eta']}")
            return
        now = time.monotonic()
        if now - self._last >= PLAIN_EVERY_S or s.done >= s.total:
            self._last = now
            print(plain_line(s), file=self.stream, flush=True)


def summary_text(s: Summary) -> str:
    """The end of a run: counts by status, tokens, wall time, where the results are."""
    by_status = ", ".join(f"{n} x {status}" for status, n in sorted(s.failed.items()))
    lines = [
        f"{'cancelled' if s.cancelled else 'finished'}: {s.done} of {s.total} lines have a "
        f"result line",
        f"  succeeded {s.succeeded}, failed {sum(s.failed.values())}"
        + (f" ({by_status})" if by_status else "")
        + f", skipped {s.skipped} (already in the output), duplicate custom_id {s.duplicates}",
        f"  tokens: {s.prompt_tokens} in, {s.completion_tokens} out; wall {s.wall_s:.1f} s",
        f"  results: {s.output}",
    ]
    if s.errors != s.output:
        lines.append(f"  error lines: {s.errors}")
    elif s.failed:
        lines.append(f"  error lines: in {s.errors} (status_code other than 200)")
    return "\n".join(lines)
