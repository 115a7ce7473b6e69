"""How ``fleet top`` draws a snapshot (rich tables), live in the terminal or printed once."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.terminal import keys
from producer.top import Poller, QueueView, Rates, Snapshot

NONE = "-"
STATE_STYLES = {"ready": "green", "idle-unloaded": "cyan", "loading": "yellow",
                "unloading": "yellow", "draining": "yellow", "failed": "bold red",
                "unreachable": "red", "stopped": "red"}
QUIT_KEYS = frozenset("qQ")


def render(snapshot: Snapshot, *, note: str) -> RenderableType:
    """The header line (ending in ``note``), the engines' table and the queues' table."""
    queued = sum(q.depth for q in snapshot.queues)
    header = Text.assemble(
        ("fleet top", "bold"),
        f"  {time.strftime('%H:%M:%S', time.localtime(snapshot.taken_at))}"
        f"  {len(snapshot.engines)} engines, {queued} tasks queued  ({note})",
    )
    return Group(header, engine_table(snapshot), queue_table(snapshot.queues))


def engine_table(snapshot: Snapshot) -> Table:
    table = Table("engine", "host", "model", "state", "in flight", "running", "waiting",
                  "req/s", "tok/s", "served", "errors", "up", title="engines",
                  title_justify="left")
    for c in table.columns[4:]:
        c.justify = "right"
    for e in snapshot.engines:
        rate = snapshot.rates.get(e["node"])
        state = str(e.get("state", NONE))
        table.add_row(
            e["engine_id"], e.get("host", NONE), e["model"],
            Text(state, style=STATE_STYLES.get(state, "")),
            _count(e.get("in_flight")), _count(e.get("running")), _count(e.get("waiting")),
            _rate(rate, "requests_per_s"), _rate(rate, "tokens_per_s"),
            _count(e.get("requests_served")), _errors(e.get("tasks_failed"), rate),
            _duration(e.get("uptime_s")),
        )
    if not snapshot.engines:
        table.add_row(Text("no engine answered", style="dim"))
    return table


def queue_table(queues: list[QueueView]) -> Table:
    table = Table("model", "queued", "by priority", "engines", "", title="queues",
                  title_justify="left")
    table.columns[1].justify = "right"
    for q in queues:
        if q.stranded:
            style, note = "bold red", "no engine takes these tasks"
        elif q.engines == 0:
            style, note = "dim", "no engine"
        else:
            style, note = "", ""
        levels = " ".join(f"{step}:{n}" for step, n in sorted(q.levels.items()) if n)
        table.add_row(q.model, str(q.depth), levels, f"{q.serving}/{q.engines}", note,
                      style=style)
    return table


def _count(value: Any) -> str:
    return NONE if value is None else str(value)


def _rate(rate: Rates | None, name: str) -> str:
    return NONE if rate is None else f"{getattr(rate, name):.1f}"


def _errors(total: Any, rate: Rates | None) -> Text:
    if total is None:
        return Text(NONE)
    recent = rate.failures if rate is not None else 0
    # Red only while failures are recent: an old total says less than a rising one.
    return Text(f"{total} (+{recent})", style="bold red") if recent else Text(str(total))


def _duration(seconds: Any) -> str:
    if seconds is None:
        return NONE
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"


def watch(poller: Poller, *, interval: float, console: Console) -> None:
    """Redraw in place every ``interval`` seconds until q (or Ctrl-C, for the caller)."""
    note = f"every {interval:g}s, rates over {poller.meter.window:g}s; q quits"
    # Ctrl-C sets a flag rather than raising: a KeyboardInterrupt raised inside a poll (Celery's
    # broadcast, kombu's reads) may be caught there and lost.
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        with keys() as read_keys, Live(console=console, screen=True, auto_refresh=False) as live:
            while not interrupted.is_set():
                deadline = time.monotonic() + interval
                live.update(render(poller.poll(), note=note), refresh=True)
                # Keys are read at least once a round, even when the poll took the interval.
                while not interrupted.is_set():
                    left = deadline - time.monotonic()
                    if QUIT_KEYS & set(read_keys(left)):
                        return
                    if left <= 0:
                        break
    finally:
        signal.signal(signal.SIGINT, previous)


def print_once(poller: Poller, *, interval: float, console: Console) -> None:
    """Print one snapshot; two polls ``interval`` apart, so it has rates."""
    poller.poll()
    time.sleep(interval)
    console.print(render(poller.poll(), note=f"rates over {interval:g}s"))
