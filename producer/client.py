"""Blocking helpers for scripts: enqueue, wait, return results in input order.

Each call validates everything first (nothing is enqueued if one item is invalid), then sends
the tasks and waits. Safe to call from several threads at once: Celery gives every thread its
own result-backend connection.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

from celery.result import AsyncResult, ResultSet

from producer.schema import Completion
from producer.tasks import ModelTask
from producer.tasks import chat as chat_task
from producer.tasks import generate as generate_task

PROGRESS_MIN_ITEMS = 32


def generate(prompt: str, *, model: str, timeout: float | None = None, **params: Any) -> Completion:
    """Complete one prompt and wait for the result."""
    return generate_batch([prompt], model=model, timeout=timeout, progress=False, **params)[0]


def chat(
    messages: Sequence[dict[str, Any]],
    *,
    model: str,
    timeout: float | None = None,
    **params: Any,
) -> Completion:
    """Answer one conversation and wait for the result."""
    return chat_batch([messages], model=model, timeout=timeout, progress=False, **params)[0]


def generate_batch(
    prompts: Iterable[str],
    *,
    model: str,
    timeout: float | None = None,
    return_exceptions: bool = False,
    progress: bool | None = None,
    **params: Any,
) -> list[Any]:
    """Complete many prompts; results come back in input order."""
    calls = [((prompt,), {"model": model, **params}) for prompt in prompts]
    return _run(generate_task, calls, timeout, return_exceptions, progress)


def chat_batch(
    conversations: Iterable[Sequence[dict[str, Any]]],
    *,
    model: str,
    timeout: float | None = None,
    return_exceptions: bool = False,
    progress: bool | None = None,
    **params: Any,
) -> list[Any]:
    """Answer many conversations; results come back in input order."""
    calls = [((list(messages),), {"model": model, **params}) for messages in conversations]
    return _run(chat_task, calls, timeout, return_exceptions, progress)


def wait_for_engine(model: str, *, timeout: float = 300.0, interval: float = 1.0) -> list[str]:
    """Wait until at least one engine consumes ``model``'s queue; return their node names.

    An engine consumes its model queue only once it has loaded and answered a warmup request,
    so a listed node is ready to serve. Raises NoEngine after ``timeout`` seconds.
    """
    import time

    from producer.celery_app import app
    from producer.errors import NoEngine
    from producer.naming import model_queue

    queue = model_queue(model)
    deadline = time.monotonic() + timeout
    while True:
        replies = app.control.inspect(timeout=interval).active_queues() or {}
        nodes = sorted(node for node, qs in replies.items() if queue in {q["name"] for q in qs})
        if nodes:
            return nodes
        if time.monotonic() >= deadline:
            raise NoEngine(f"no engine serves model {model!r} after {timeout:.0f}s")


def _run(
    task: ModelTask,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    timeout: float | None,
    return_exceptions: bool,
    progress: bool | None,
) -> list[Any]:
    requests = [task.validate(args, kwargs) for args, kwargs in calls]
    handles = [task.send(request) for request in requests]
    values = _collect(handles, timeout, _wants_progress(progress, len(handles)))
    out: list[Any] = []
    for value in values:
        if isinstance(value, BaseException):
            if not return_exceptions:
                raise value
            out.append(value)
        else:
            out.append(Completion.model_validate(value, strict=False))
    return out


def _collect(handles: list[AsyncResult], timeout: float | None, progress: bool) -> list[Any]:
    """Wait for every result; exceptions are returned in place, not raised."""
    index = {handle.id: i for i, handle in enumerate(handles)}
    values: list[Any] = [None] * len(handles)
    bar = _progress_bar(len(handles)) if progress else nullcontext(None)
    with bar as advance:

        def on_result(task_id: str, value: Any) -> None:
            values[index[task_id]] = value
            if advance is not None:
                advance()

        ResultSet(handles).join_native(timeout=timeout, propagate=False, callback=on_result)
    return values


def _wants_progress(progress: bool | None, n: int) -> bool:
    if progress is None:
        return n >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
    return progress


class _progress_bar:
    """A rich progress bar on stderr; yields a callable that advances it by one."""

    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._task = self._progress.add_task("generating", total=total)

    def __enter__(self) -> Any:
        self._progress.start()
        return lambda: self._progress.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
