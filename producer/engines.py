"""The live engines of the fleet, as their workers report them over Celery remote control.

No registry of our own: each worker answers the ``engine`` inspect command
(``celery -A producer inspect engine`` shows the same data).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from producer.celery_app import app
from producer.naming import model_queue

POLL_S = 0.2


def list_engines(model: str | None = None, *, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Every engine that answered within ``timeout``, with its node and its model's queue depth
    (``queue_depth``, and ``queued_by_priority``: the kombu priority steps that hold tasks)."""
    replies = app.control.broadcast("engine", reply=True, timeout=timeout)
    engines = []
    for reply in replies:
        for node, info in reply.items():
            if info and (model is None or info.get("model") == model):
                engines.append({"node": node, "host": node.partition("@")[2], **info})
    levels = queue_levels({e["model"] for e in engines})
    for engine in engines:
        steps = levels.get(engine["model"], {})
        engine["queue_depth"] = sum(steps.values())
        engine["queued_by_priority"] = {str(step): n for step, n in steps.items() if n}
    return sorted(engines, key=lambda e: (e["model"], e["engine_id"]))


def health(engine_id: str, *, timeout: float = 5.0) -> dict[str, Any] | None:
    """The engine's own answer to ``engine_health`` (its engine thread answers a ping between
    two steps), or None when no worker of that engine id answered within ``timeout``."""
    replies = app.control.broadcast("engine_health", reply=True, timeout=timeout)
    for reply in replies:
        for node, info in reply.items():
            if info and info.get("engine_id") == engine_id:
                return {"node": node, **info}
    return None


def queue_depths(models: Iterable[str]) -> dict[str, int]:
    """Tasks waiting in each model's queue, every priority step counted."""
    return {model: sum(levels.values()) for model, levels in queue_levels(models).items()}


def queue_levels(models: Iterable[str]) -> dict[str, dict[int, int]]:
    """Tasks waiting in each model's queue, by kombu priority step, in one Redis round trip."""
    models = sorted(models)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        steps = list(channel.priority_steps)
        pipe = channel.client.pipeline(transaction=False)
        for model in models:
            for step in steps:
                # kombu keeps each step but 0 in a list of its own, ``<queue>\x06\x16<step>``
                # (a private name, pinned in tests/test_pins.py).
                pipe.llen(channel._q_for_pri(model_queue(model), step))
        lengths = iter(pipe.execute())
    return {model: {step: int(next(lengths)) for step in steps} for model in models}


def select_nodes(engine_ids: list[str], *, model: str | None = None, every: bool = False,
                 timeout: float = 1.0) -> list[str]:
    """Node names of the live engines picked by id, by model, or all of them."""
    engines = list_engines(timeout=timeout)
    return sorted(
        e["node"] for e in engines
        if every or e["engine_id"] in engine_ids or (model is not None and e["model"] == model)
    )


def shutdown(nodes: list[str], *, wait: float | None = 300.0) -> list[str]:
    """Warm-shut these engines down (Celery's ``shutdown`` control) and wait until they are
    gone; return the nodes still answering when ``wait`` ran out (none if all stopped)."""
    if not nodes:
        return []
    app.control.shutdown(destination=nodes)
    if not wait:
        return nodes
    deadline = time.monotonic() + wait
    alive = list(nodes)
    while alive and time.monotonic() < deadline:
        replies = app.control.ping(destination=alive, timeout=1.0) or []
        answering = {node for reply in replies for node in reply}
        alive = [node for node in alive if node in answering]
        if alive:
            time.sleep(POLL_S)  # replies come back at once: do not hammer the broker
    return alive


def drain(nodes: list[str], *, wait: float | None = 300.0) -> list[str]:
    """Stop these engines consuming, let them finish every task they already took, then shut
    them down; return the nodes still answering when ``wait`` ran out."""
    app.control.broadcast("engine_drain", destination=nodes, reply=True, timeout=5.0)
    deadline = time.monotonic() + (wait or 0)
    busy = set(nodes)
    while busy and time.monotonic() < deadline:
        inspect = app.control.inspect(destination=sorted(busy), timeout=1.0)
        active, reserved = inspect.active() or {}, inspect.reserved() or {}
        busy = {n for n in busy if active.get(n) or reserved.get(n)}
        if busy:
            time.sleep(POLL_S)
    return shutdown(nodes, wait=wait)
