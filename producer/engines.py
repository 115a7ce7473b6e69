"""The live engines of the fleet, as their workers report them over Celery remote control.

No registry of our own: each worker answers the ``engine`` inspect command
(``celery -A producer inspect engine`` shows the same data).
"""

from __future__ import annotations

from typing import Any

from producer.celery_app import app
from producer.naming import model_queue


def list_engines(model: str | None = None, *, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Every engine that answered within ``timeout``, with its node and its model's queue depth."""
    replies = app.control.broadcast("engine", reply=True, timeout=timeout)
    engines = []
    for reply in replies:
        for node, info in reply.items():
            if info and (model is None or info.get("model") == model):
                engines.append({"node": node, "host": node.partition("@")[2], **info})
    depths = queue_depths({e["model"] for e in engines})
    for engine in engines:
        engine["queue_depth"] = depths.get(engine["model"])
    return sorted(engines, key=lambda e: (e["model"], e["engine_id"]))


def queue_depths(models: set[str]) -> dict[str, int]:
    """Tasks waiting in each model's queue (Redis list length)."""
    with app.connection_for_read() as connection:
        client = connection.default_channel.client
        return {m: int(client.llen(model_queue(m))) for m in models}
