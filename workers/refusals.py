"""Messages a worker cannot run end somewhere visible, never only in a log.

Celery logs and drops a message it cannot read as a task (no task name, a body that does not
decode, arguments of the wrong shape, content it refuses) and stores an error result for an
unknown task name, even with a null task id. Here each such message is kept in
``fleet.dead.malformed`` (see :func:`producer.transport.malformed_entry`) and, when it names
a task id, the task gets an error result too, so a caller waiting on it hears why. The
message is then acknowledged: it would fail the same way every time it came back.
"""

from __future__ import annotations

import logging
from typing import Any

from producer.errors import InvalidRequest
from producer.transport import keep_malformed

log = logging.getLogger(__name__)


def task_id_of(message: Any) -> str | None:
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None


def envelope_problem(message: Any) -> str | None:
    """Why a task message cannot run, or None. Decodes the body (kombu caches it for the
    request that follows); a body that does not decode raises, as it would there."""
    if task_id_of(message) is None:
        return "no task id"
    payload = message.payload
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not (isinstance(args, list | tuple) and isinstance(kwargs, dict)
            and isinstance(embed, dict | type(None))):
        return "body is not [args, kwargs, embed] of a list and two objects"
    return None


def refuse(app: Any, message: Any, reason: str, *, trusted: bool = True) -> None:
    """Keep ``message`` as malformed, fail its task if it names one, acknowledge it.

    An untrusted message (unsigned where signing is on, a content type the worker refuses)
    writes no result: its sender may not decide the outcome of any task id.
    """
    try:
        keep_malformed(app.backend.client, getattr(message, "_raw", None) or message.body,
                       reason)
        task_id = task_id_of(message)
        if trusted and task_id is not None:
            app.backend.mark_as_failure(
                task_id, InvalidRequest(f"malformed task message: {reason}"),
                call_errbacks=False)
    except Exception:  # Redis away: the message is still acknowledged, as Celery does
        log.exception("could not keep a refused message")
    try:
        message.ack()
    except Exception:
        log.debug("could not ack a refused message", exc_info=True)
