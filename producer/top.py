"""``fleet top``: the fleet's engines and model queues, polled at an interval, with rates.

The figures are each worker's answer to the ``engine`` inspect command (its cumulative counters;
rates are their differences over a short window) and the lengths of the model queues in Redis,
every priority level included. Rendering is in ``producer/topview.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from producer.engines import list_engines, queue_levels

WINDOW_S = 5.0
#: States in which an engine takes tasks from its model queue (an idle-unloaded one reloads).
SERVING = frozenset({"ready", "idle-unloaded"})


@dataclass(frozen=True, slots=True)
class Sample:
    """One engine's cumulative counters at one moment (``at``: monotonic seconds)."""

    at: float
    uptime_s: float
    requests: int
    tokens: int
    failed: int


@dataclass(frozen=True, slots=True)
class Rates:
    """What one engine did between the oldest and newest samples of its window."""

    requests_per_s: float
    tokens_per_s: float
    failures: int
    span_s: float


def sample_of(engine: dict[str, Any], at: float) -> Sample:
    """The counters of one ``engine`` inspect answer; a counter a worker does not report is 0."""
    return Sample(at, float(engine.get("uptime_s") or 0.0), int(engine.get("requests_served") or 0),
                  int(engine.get("tokens_generated") or 0), int(engine.get("tasks_failed") or 0))


def restarted(before: Sample, after: Sample) -> bool:
    """Whether the engine started over between two samples: its uptime or a counter went down."""
    return (after.uptime_s < before.uptime_s or after.requests < before.requests
            or after.tokens < before.tokens or after.failed < before.failed)


def record(history: tuple[Sample, ...], sample: Sample, window: float) -> tuple[Sample, ...]:
    """``history`` with ``sample`` added, less the samples that ``window`` seconds do not need."""
    if history and restarted(history[-1], sample):
        return (sample,)
    kept = (*history, sample)
    # The last sample at or before the window's start stays, so the rates span the whole window.
    while len(kept) > 2 and kept[1].at <= sample.at - window:
        kept = kept[1:]
    return kept


def rates(history: tuple[Sample, ...]) -> Rates | None:
    """The rates between the oldest and newest samples; None until two samples apart exist."""
    if len(history) < 2 or history[-1].at <= history[0].at:
        return None
    first, last = history[0], history[-1]
    span = last.at - first.at
    return Rates((last.requests - first.requests) / span, (last.tokens - first.tokens) / span,
                 last.failed - first.failed, span)


class Meter:
    """The recent samples of each live engine, by node; an engine that left is forgotten."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self.histories: dict[str, tuple[Sample, ...]] = {}

    def update(self, engines: list[dict[str, Any]], at: float) -> dict[str, Rates | None]:
        """Record one poll's answers; the rates of each engine, by node."""
        self.histories = {
            e["node"]: record(self.histories.get(e["node"], ()), sample_of(e, at), self.window)
            for e in engines
        }
        return {node: rates(history) for node, history in self.histories.items()}


@dataclass(frozen=True, slots=True)
class QueueView:
    """One model's queue: tasks waiting per priority step, and the engines of the model."""

    model: str
    levels: dict[int, int]
    engines: int
    serving: int

    @property
    def depth(self) -> int:
        return sum(self.levels.values())

    @property
    def stranded(self) -> bool:
        """Tasks wait and no engine of the model takes them."""
        return self.depth > 0 and self.serving == 0


def queue_views(models: Iterable[str], levels: dict[str, dict[int, int]],
                engines: list[dict[str, Any]]) -> list[QueueView]:
    """A view per model (those given and those of live engines), sorted by model."""
    views = []
    for model in sorted(set(models) | {e["model"] for e in engines}):
        mine = [e for e in engines if e["model"] == model]
        views.append(QueueView(model, levels.get(model, {}), len(mine),
                               sum(e.get("state") in SERVING for e in mine)))
    return views


@dataclass(frozen=True)
class Snapshot:
    """What one refresh of ``fleet top`` shows."""

    engines: list[dict[str, Any]]
    rates: dict[str, Rates | None]
    queues: list[QueueView]
    taken_at: float


class Poller:
    """Polls the fleet for snapshots; keeps the samples its rates come from."""

    def __init__(self, models: Iterable[str], *, model: str | None = None,
                 window: float = WINDOW_S, timeout: float = 0.5) -> None:
        self.models = {model} if model else set(models)
        self.model = model
        self.timeout = timeout
        self.meter = Meter(window)

    def poll(self) -> Snapshot:
        """The engines that answer within the timeout, their rates, and every queue's depth."""
        engines = list_engines(self.model, timeout=self.timeout)
        found = self.meter.update(engines, time.monotonic())
        models = self.models | {e["model"] for e in engines}
        return Snapshot(engines, found, queue_views(models, queue_levels(models), engines),
                        time.time())
