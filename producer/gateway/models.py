"""Which models the fleet serves now, as the gateway answers ``/v1/models`` and routes requests.

No registry of its own: the live engines are what the workers answer to the ``engine`` remote
control command (``producer.engines.list_engines``), asked every ``refresh_s`` seconds off the
event loop and kept. Names resolve through the fleet config (ids and ``served_model_name``
aliases) and, for a gateway started without the config, through the aliases engines report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from producer.errors import UnknownModel
from producer.settings import FleetSettings

log = logging.getLogger(__name__)

#: Engine states that count as serving: ready, or reloading itself on the next request.
LIVE_STATES = frozenset({"ready", "idle-unloaded", "loading"})
#: States in which an engine answers a request without a load first.
READY_STATES = frozenset({"ready", "idle-unloaded"})


class ModelDirectory:
    """The live engines by model, refreshed in the background."""

    def __init__(self, settings: FleetSettings, refresh_s: float = 2.0) -> None:
        self.settings = settings
        self.refresh_s = refresh_s
        self.engines: list[dict[str, Any]] = []
        # An engine whose reply missed one broadcast's window (a busy worker on a loaded
        # machine) is kept from its last answer for this long, rather than its model turning
        # unavailable until the next refresh: a request to it only waits on its queue.
        self.keep_s = 2.5 * refresh_s
        #: engine id -> (monotonic time of its last answer, that answer)
        self._seen: dict[str, tuple[float, dict[str, Any]]] = {}
        self.refreshed = 0.0  # monotonic time of the last answer; 0: never
        self.started = int(time.time())
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            with contextlib.suppress(Exception):
                await self.refresh()

    async def refresh(self) -> None:
        """Ask the workers again (one refresh at a time; a caller arriving meanwhile shares it)."""
        from producer.engines import list_engines

        started = time.monotonic()
        async with self._lock:
            if self.refreshed > started:
                return
            try:
                engines = await asyncio.to_thread(list_engines, timeout=0.5)
            except Exception:
                log.warning("could not list the engines", exc_info=True)
                return
            now = time.monotonic()
            self._seen.update((engine["engine_id"], (now, engine)) for engine in engines)
            self._seen = {engine_id: seen for engine_id, seen in self._seen.items()
                          if now - seen[0] < self.keep_s}
            self.engines = [engine for _, engine in self._seen.values()]
            self.refreshed = now

    def resolve(self, name: str) -> str:
        """The model id ``name`` stands for (an id or an alias); UnknownModel if none."""
        try:
            return self.settings.resolve_model(name)
        except UnknownModel:
            for engine in self.engines:
                if name == engine["model"] or name in (engine.get("aliases") or ()):
                    return str(engine["model"])
            raise

    def live(self, model: str, states: frozenset[str] = LIVE_STATES) -> list[dict[str, Any]]:
        return [e for e in self.engines if e["model"] == model and e.get("state") in states]

    async def live_now(self, model: str) -> list[dict[str, Any]]:
        """The live engines of ``model``, asking again first if none was live at the last look
        (an engine that just started is found at once, not a refresh later)."""
        engines = self.live(model)
        if not engines and time.monotonic() - self.refreshed > 0.5:
            await self.refresh()
            engines = self.live(model)
        return engines

    def listing(self) -> list[dict[str, Any]]:
        """``/v1/models``' entries: every model with a live engine, under each of its names."""
        out: dict[str, dict[str, Any]] = {}
        for engine in self.engines:
            if engine.get("state") not in LIVE_STATES:
                continue
            model = engine["model"]
            for name in [model, *(engine.get("aliases") or ())]:
                entry = out.setdefault(name, {
                    "id": name, "object": "model", "created": self.started,
                    "owned_by": "vllm-fleet", "root": model, "parent": None,
                    "max_model_len": engine.get("max_model_len"),
                    "permission": [permission(name, self.started)]})
                if entry["max_model_len"] is None:
                    entry["max_model_len"] = engine.get("max_model_len")
        return sorted(out.values(), key=lambda e: e["id"])


def permission(name: str, created: int) -> dict[str, Any]:
    """The permission entry vLLM's server lists with each model (clients may read it)."""
    return {"id": f"modelperm-{name}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}
