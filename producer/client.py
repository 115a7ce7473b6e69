"""Blocking helpers for scripts: enqueue, wait, return results in input order.

Each call validates everything first (nothing is enqueued if one item is invalid; the error
names the item, ``prompts.3: ...``), then sends the tasks and waits. Safe to call from several
threads at once: Celery gives every thread its own result-backend connection.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from celery.result import AsyncResult, ResultSet

from producer.errors import FleetError, InvalidRequest
from producer.schema import (
    MAX_BATCH,
    Completion,
    ItemResult,
    ManyRequest,
    Sampling,
    Scheduling,
    parse,
)
from producer.streams import TextStream
from producer.tasks import ManyTask, ModelTask, chat_many, generate_many, item_wire, with_params
from producer.tasks import chat as chat_task
from producer.tasks import generate as generate_task

PROGRESS_MIN_ITEMS = 32
DEFAULT_CHUNK = 256
#: A reusable set of sampling knobs: keywords of the same call win over it.
Params = Sampling | Mapping[str, Any] | None


def generate(prompt: str, *, model: str, params: Params = None, timeout: float | None = None,
             **sampling: Any) -> Completion:
    """Complete one prompt and wait for the result."""
    return _one(generate_task, (prompt,), {"model": model, "params": params, **sampling}, timeout)


def chat(
    messages: Sequence[dict[str, Any]],
    *,
    model: str,
    params: Params = None,
    timeout: float | None = None,
    **sampling: Any,
) -> Completion:
    """Answer one conversation and wait for the result."""
    return _one(chat_task, (list(messages),), {"model": model, "params": params, **sampling},
                timeout)


def stream_generate(prompt: str, *, model: str, params: Params = None,
                    timeout: float | None = None, **sampling: Any) -> TextStream:
    """Complete one prompt, following the text as it is generated::

        with stream_generate("Once upon a time", model="tiny", max_tokens=64) as text:
            for piece in text:
                print(piece, end="", flush=True)
        print(text.completion.finish_reason)

    Validated before anything is sent, like :func:`generate`; leaving the block early revokes
    the task. A text cut off because its worker was lost raises StreamBroken (never restarted
    or spliced text).
    """
    handle = generate_task.apply_async(
        (prompt,), {"model": model, "params": params, **sampling, "stream": True})
    return TextStream(handle, timeout)


def stream_chat(messages: Sequence[dict[str, Any]], *, model: str, params: Params = None,
                timeout: float | None = None, **sampling: Any) -> TextStream:
    """Answer one conversation, following the reply as it is generated (as
    :func:`stream_generate`). With tools offered, the reply comes whole at the end and its
    calls are in ``completion.tool_calls``."""
    handle = chat_task.apply_async(
        (list(messages),), {"model": model, "params": params, **sampling, "stream": True})
    return TextStream(handle, timeout)


def generate_batch(
    prompts: Iterable[str | dict[str, Any]],
    *,
    model: str,
    timeout: float | None = None,
    return_exceptions: bool = False,
    progress: bool | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    priority: int | str = "batch",
    params: Params = None,
    **sampling: Any,
) -> list[Any]:
    """Complete many prompts; results come back in input order.

    An item is a prompt, or a dict of one request's fields (``{"prompt": ..., "max_tokens": 8}``)
    that override the call's sampling keywords, which override ``params``. Prompts travel
    ``chunk_size`` to a message (task ``fleet.generate_many``), so the queue costs one round
    trip per chunk, not per prompt; chunks spread over the model's engines. Every item has the
    call's ``priority`` (by default ``batch``: interactive and default requests for the model
    go ahead of it).
    """
    shared = with_params(params, sampling)
    calls = [_call("prompt", item, model, shared) for item in prompts]
    return _run(generate_task, generate_many, calls, "prompts", timeout, return_exceptions,
                progress, chunk_size, priority)


def chat_batch(
    conversations: Iterable[Sequence[dict[str, Any]] | dict[str, Any]],
    *,
    model: str,
    timeout: float | None = None,
    return_exceptions: bool = False,
    progress: bool | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    priority: int | str = "batch",
    params: Params = None,
    **sampling: Any,
) -> list[Any]:
    """Answer many conversations, in input order; an item is a message list or a dict of one
    request's fields (``{"messages": [...], "seed": 1}``). Chunked and prioritised like
    generate_batch."""
    shared = with_params(params, sampling)
    calls = [_call("messages", item, model, shared) for item in conversations]
    return _run(chat_task, chat_many, calls, "conversations", timeout, return_exceptions,
                progress, chunk_size, priority)


def wait_for_engine(model: str, *, timeout: float = 300.0, interval: float = 1.0) -> list[str]:
    """Wait until at least one engine consumes ``model``'s queue; return their node names.

    An engine consumes its model queue only once it has loaded and answered a warmup request,
    so a listed node is ready to serve. Raises NoEngine after ``timeout`` seconds.
    """
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


def _call(field: str, item: Any, model: str,
          shared: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The (args, kwargs) of one batch item: a bare value, or a dict of its own fields."""
    if isinstance(item, dict):
        return (), {"model": model, **shared, **item}
    # A tuple of messages is a conversation too; anything else is left for validation to name.
    if field == "messages" and isinstance(item, tuple):
        item = list(item)
    return (item,), {"model": model, **shared}


def _one(task: ModelTask, args: tuple[Any, ...], kwargs: dict[str, Any],
         timeout: float | None) -> Completion:
    value = task.apply_async(args, kwargs).get(timeout=timeout)
    return Completion.model_validate(value, strict=False)


def _run(
    item_task: ModelTask,
    many_task: ManyTask,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    items_name: str,
    timeout: float | None,
    return_exceptions: bool,
    progress: bool | None,
    chunk_size: int,
    priority: int | str,
) -> list[Any]:
    if chunk_size < 1:
        raise InvalidRequest(f"chunk_size: must be at least 1 (got {chunk_size})")
    chunk_size = min(chunk_size, MAX_BATCH)
    level = parse(Scheduling, {"priority": priority}).priority
    requests = _validate(item_task, calls, items_name)
    for i, request in enumerate(requests):
        if request.priority is not None:  # a chunk is one message: one place in the queue
            raise InvalidRequest(f"{items_name}.{i}.priority: items share the call's "
                                 f"priority; pass priority= to the call")
    if not requests:
        return []
    chunks = [requests[i:i + chunk_size] for i in range(0, len(requests), chunk_size)]
    handles = [
        many_task.send(ManyRequest(requests=[item_wire(r) for r in chunk], model=chunk[0].model,
                                   priority=level))
        for chunk in chunks
    ]
    values = _collect(handles, [len(c) for c in chunks], timeout,
                      _wants_progress(progress, len(requests)))
    out: list[Any] = []
    for chunk, value in zip(chunks, values, strict=True):
        items = value if isinstance(value, list) else [{"failed": value}] * len(chunk)
        for item in items:
            outcome = _outcome(item)
            if isinstance(outcome, BaseException) and not return_exceptions:
                if "error" in item:  # this item's own error: say which item it is
                    raise type(outcome)(f"{items_name}.{len(out)}: {outcome}")
                raise outcome
            out.append(outcome)
    return out


def _validate(item_task: ModelTask, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
              items_name: str) -> list[Any]:
    """Every item's validated request; InvalidRequest naming the first bad item's index."""
    requests = []
    for i, (args, kwargs) in enumerate(calls):
        try:
            requests.append(item_task.validate(args, kwargs))
        except InvalidRequest as e:
            raise InvalidRequest(f"{items_name}.{i}: {e}") from None
    return requests


def _outcome(item: dict[str, Any]) -> Completion | BaseException:
    """A completion, or the error it stands for, from one entry of a many-request's result."""
    if "failed" in item:  # the whole message failed
        error = item["failed"]
        return error if isinstance(error, BaseException) else FleetError(str(error))
    return ItemResult.model_validate(item, strict=False).outcome()


def _collect(handles: list[AsyncResult], sizes: list[int], timeout: float | None,
             progress: bool) -> list[Any]:
    """Wait for every result; exceptions are returned in place, not raised."""
    index = {handle.id: i for i, handle in enumerate(handles)}
    values: list[Any] = [None] * len(handles)
    bar = _progress_bar(sum(sizes)) if progress else nullcontext(None)
    with bar as advance:

        def on_result(task_id: str, value: Any) -> None:
            i = index[task_id]
            values[i] = value
            if advance is not None:
                advance(sizes[i])

        ResultSet(handles).join_native(timeout=timeout, propagate=False, callback=on_result)
    return values


def _wants_progress(progress: bool | None, n: int) -> bool:
    if progress is None:
        return n >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
    return progress


class _progress_bar:
    """A rich progress bar on stderr; yields a callable that advances it by n items."""

    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._task = self._progress.add_task("generating", total=total)

    def __enter__(self) -> Any:
        self._progress.start()
        return lambda n: self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
