"""Test-only: watch a real worker's vLLM engine from inside, through vLLM's own bookkeeping.

Loaded into a worker by the tests only (``celery worker --include tests.engine_probe``); the
fleet ships no such module. Importing it wraps every vLLM ``LLMEngine`` the worker process
builds, from its first request on, so a test can ask the engine itself (not the fleet's own
counters) which requests it was given, how many it held at once and how many are unfinished.
Reads and writes of the record happen under the GIL between two engine calls: consistent
enough for counts that a test compares after the work is done.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from celery.worker.control import control_command, inspect_command

from workers.engines.vllm import VLLMEngine, in_process_scheduler

_added: Counter[str] = Counter()  # request id -> times vLLM's add_request took it
_priority: dict[str, int] = {}  # request id -> its priority in vLLM's scheduler
_peak = {"unfinished": 0}  # most unfinished requests vLLM held at one step since the reset
_engines: list[Any] = []  # every LLMEngine this process built, newest last
_delay = {"seconds": 0.0}  # added before every engine step: work made long by construction


def _probe(llm: Any) -> Any:
    add_request, step = llm.add_request, llm.step

    def probed_add(request_id: str, *args: Any, **kwargs: Any) -> Any:
        out = add_request(request_id, *args, **kwargs)
        _added[request_id] += 1
        scheduler = in_process_scheduler(llm)
        if scheduler is not None and scheduler.requests:  # the engine core runs here
            # The request just added, under vLLM's internal id (the given one plus a suffix).
            request = next(reversed(scheduler.requests.values()))
            if request.request_id.startswith(request_id):
                _priority[request_id] = request.priority
        return out

    def probed_step(*args: Any, **kwargs: Any) -> Any:
        _peak["unfinished"] = max(_peak["unfinished"], llm.get_num_unfinished_requests())
        if _delay["seconds"]:
            time.sleep(_delay["seconds"])
        return step(*args, **kwargs)

    llm.add_request, llm.step = probed_add, probed_step
    _engines.append(llm)
    return llm


_build = VLLMEngine._build


def _probed_build(self: VLLMEngine) -> Any:
    return _probe(_build(self))


VLLMEngine._build = _probed_build  # type: ignore[method-assign]


def _unfinished() -> int:
    return int(_engines[-1].get_num_unfinished_requests()) if _engines else 0


@inspect_command(args=[("reset", bool)], signature="[reset=False]")
def probe(state: Any, reset: bool = False) -> dict[str, Any]:
    """What vLLM itself saw: requests added (id -> times), their priority in its scheduler,
    peak and current unfinished."""
    seen = {"added": dict(_added), "priority": dict(_priority),
            "peak_unfinished": _peak["unfinished"],
            "unfinished": _unfinished()}
    if reset:
        _peak["unfinished"] = _unfinished()
    return seen


@control_command(args=[("seconds", float)], signature="<seconds>")
def probe_slow_steps(state: Any, seconds: float) -> dict[str, Any]:
    """Make every engine step of this worker take ``seconds`` longer (0: as fast as it is)."""
    _delay["seconds"] = seconds
    return {"ok": True}
