"""Names shared by producers and workers: task names, queue names, node names.

Queues (one Redis list each, named exactly like the queue):

    fleet.model.<model_id>    generation and chat tasks for one model; every engine of that
                              model consumes it, so engines of one model share the work
    fleet.engine.<engine_id>  tasks and lifecycle requests for one engine only

Dead-lettered tasks (see ``workers/delivery.py``) are kept, as JSON, in the Redis list
``fleet.dead.<model_id>`` (no worker consumes it); messages refused as malformed in
``fleet.dead.malformed`` (see ``producer/transport.py`` and ``workers/consumer.py``). A task
sent with ``stream=True`` has its text deltas in the Redis stream ``fleet.stream.<task_id>``
while it generates (``producer/streams.py``). Every
other Redis key the fleet reads or writes is named here too.

A worker's node name is ``<engine_id>@<host>``, so ``celery control ... -d <engine_id>@<host>``
targets exactly one engine.

Ids: an engine id is plain (``ID_PATTERN``: letters, digits, ``.``, ``_``, ``-``), since it is
part of a node name. A model id is written as Hugging Face writes it (``MODEL_ID_PATTERN``): a
plain id, or two joined by one ``/`` (``Qwen/Qwen3-8B``, queue ``fleet.model.Qwen/Qwen3-8B``);
Redis keys and kombu queue names take the slash as it is.
"""

from __future__ import annotations

import re
import socket

GENERATE_TASK = "fleet.generate"
CHAT_TASK = "fleet.chat"
GENERATE_MANY_TASK = "fleet.generate_many"
CHAT_MANY_TASK = "fleet.chat_many"
WARMUP_TASK = "fleet.warmup"
ENGINE_STATUS_TASK = "fleet.engine_status"
#: Message header with the time (Unix seconds) a fleet producer sent the task: a worker's
#: ``fleet_task_queue_seconds`` is measured from it.
SENT_AT_HEADER = "fleet_sent_at"
#: Header of a message a worker gave back unrun when it closed its channel (kombu requeues what
#: it took and never acknowledged): delivered again, but not a delivery lost with a worker.
GIVEN_BACK_HEADER = "fleet_given_back"
#: Every task a fleet worker runs; a message naming any other (Celery's built-ins included) is
#: refused, whatever queue it came on.
FLEET_TASKS = frozenset({GENERATE_TASK, CHAT_TASK, GENERATE_MANY_TASK, CHAT_MANY_TASK,
                         WARMUP_TASK, ENGINE_STATUS_TASK})

MODEL_QUEUE_PREFIX = "fleet.model."
ENGINE_QUEUE_PREFIX = "fleet.engine."
DEAD_LETTER_PREFIX = "fleet.dead."
#: Redis list of messages refused as malformed (no worker consumes it).
MALFORMED_QUEUE = DEAD_LETTER_PREFIX + "malformed"
DELIVERIES_PREFIX = "fleet.deliveries."
STREAM_PREFIX = "fleet.stream."
#: A Redis list per queue that holds an entry while the queue may hold messages: the fleet's
#: producers push to it beside each message, so a worker can wait on one key for every
#: priority step of its model's queue (``producer/transport.py``).
WAKE_PREFIX = "fleet.wake."
#: Kombu's Redis transport's own keys for delivered, unacknowledged messages (its defaults,
#: which the fleet keeps): a hash tag -> [message, exchange, routing key], and their delivery
#: times in a sorted set; and the lock a worker holds while it sweeps them.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
UNACKED_MUTEX_KEY = "unacked_mutex"

_PLAIN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# Engine ids end up in node names (<engine_id>@<host>), where only plain characters are safe.
ID_PATTERN = rf"^{_PLAIN}$"
#: A Hugging Face id (``org/name``) or a plain one; each part is at most 128 characters.
MODEL_ID_PATTERN = rf"^{_PLAIN}(?:/{_PLAIN})?$"
# fullmatch: "$" alone would also accept a trailing newline.
_ID_RE = re.compile(ID_PATTERN)
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


def check_id(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid engine id (a plain id), else raise ValueError."""
    if not _ID_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must match {ID_PATTERN} (letters, digits, '.', '_', '-')"
        )
    return value


def check_model_id(value: str, *, what: str = "model id") -> str:
    """Return ``value`` if it is a valid model id (plain, or ``org/name``), else ValueError."""
    if not _MODEL_ID_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must match {MODEL_ID_PATTERN} (letters, digits, '.', '_', '-', "
            f"and at most one '/' between two parts, as in Qwen/Qwen3-8B)"
        )
    return value


def model_queue(model_id: str) -> str:
    """Queue that carries the tasks of one model."""
    return MODEL_QUEUE_PREFIX + check_model_id(model_id)


def engine_queue(engine_id: str) -> str:
    """Queue that carries the tasks addressed to one engine."""
    return ENGINE_QUEUE_PREFIX + check_id(engine_id, what="engine id")


def dead_letter_queue(model_id: str) -> str:
    """Redis list holding the dead-lettered tasks of one model (``unknown`` if it had none)."""
    return DEAD_LETTER_PREFIX + (model_id if _MODEL_ID_RE.fullmatch(model_id) else "unknown")


def deliveries_key(task_id: str) -> str:
    """Redis counter of how often a task was redelivered (see ``workers/delivery.py``)."""
    return DELIVERIES_PREFIX + task_id


def stream_key(task_id: str) -> str:
    """Redis stream of a streaming task's text deltas (see ``producer/streams.py``)."""
    return STREAM_PREFIX + task_id


def node_name(engine_id: str, host: str | None = None) -> str:
    """Celery node name of an engine's worker."""
    return f"{check_id(engine_id, what='engine id')}@{host or socket.gethostname()}"


def wake_key(queue: str) -> str:
    """The wake list of a queue (see ``WAKE_PREFIX``)."""
    return WAKE_PREFIX + queue
