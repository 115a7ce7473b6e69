"""Bad input, property-based: refused before enqueue, or an error result; the worker stays up.

Part one throws malformed calls at the producer API (no worker involved): each is refused with
an error naming the field and nothing reaches Redis. Part two pushes raw malformed messages
straight onto a real worker's model queue (real vLLM engine), a well-formed task after each:
the worker never dies, every well-formed task succeeds, no message is left behind or loops.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import (
    PromptTooLong,
    RequestRejected,
    RequestTooLarge,
    chat,
    generate,
    generate_many,
)
from producer.naming import MALFORMED_QUEUE, MODEL_ID_PATTERN
from producer.schema import MAX_BATCH, MAX_PROMPT_CHARS, GenerateRequest
from producer.transport import MALFORMED_KEEP_BYTES
from tests.field_errors import assert_names_field
from tests.harness import WorkerProc
from tests.redis_traffic import nothing_sent

MODEL = "bad-input"  # served by no worker
FIELDS = set(GenerateRequest.model_fields)
NUMERIC = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty",
           "presence_penalty", "frequency_penalty", "seed"]
OUT_OF_RANGE = {
    "temperature": st.floats(max_value=-1e-6) | st.floats(min_value=100.001),
    "top_p": st.floats(max_value=0.0) | st.floats(min_value=1.0001),
    "top_k": st.integers(max_value=-2),
    "max_tokens": st.integers(max_value=0) | st.integers(min_value=131_073),
    "repetition_penalty": st.floats(max_value=0.0) | st.floats(min_value=10.001),
    "presence_penalty": st.floats(max_value=-2.001) | st.floats(min_value=2.001),
    "seed": st.integers(max_value=-1) | st.integers(min_value=2**63),
}
NOT_A_NUMBER = st.text(max_size=5) | st.lists(st.integers(), max_size=2) | st.none().map(
    lambda _: {"x": 1})
NOT_A_STRING = st.integers() | st.floats(allow_nan=False) | st.lists(st.text(), max_size=2)
# Neither a plain id nor an org/name model id (so bad as an engine id and as a model id).
BAD_IDS = st.text(min_size=1, max_size=20).filter(
    lambda s: re.fullmatch(MODEL_ID_PATTERN, s) is None)


def _base() -> dict[str, Any]:
    return {"prompt": "Write a haiku", "model": MODEL, "max_tokens": 8}


@st.composite
def malformed_generate(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A generate call that is invalid, and the field its error must name."""
    kwargs = _base()
    kind = draw(st.sampled_from(["unknown", "type", "range", "missing", "model", "prompt"]))
    if kind == "unknown":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS))
        kwargs[key] = draw(st.integers() | st.text(max_size=5))
        return kwargs, key
    if kind == "type":
        field = draw(st.sampled_from(NUMERIC))
        kwargs[field] = draw(NOT_A_NUMBER)
        return kwargs, field
    if kind == "range":
        field = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        kwargs[field] = draw(OUT_OF_RANGE[field])
        return kwargs, field
    if kind == "missing":
        field = draw(st.sampled_from(["prompt", "model"]))
        del kwargs[field]
        return kwargs, field
    if kind == "model":
        kwargs["model"] = draw(BAD_IDS | NOT_A_STRING)
        return kwargs, "model"
    kwargs["prompt"] = draw(NOT_A_STRING | st.just(""))
    return kwargs, "prompt"


@st.composite
def malformed_chat(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    message: dict[str, Any] = {"role": "user", "content": "hi"}
    kind = draw(st.sampled_from(["role", "content", "extra", "empty", "shape"]))
    messages: Any = [message]
    if kind == "role":
        message["role"] = draw(st.text(max_size=10).filter(
            lambda r: r not in ("system", "user", "assistant", "tool")))
    elif kind == "content":
        message["content"] = draw(NOT_A_STRING)
    elif kind == "extra":
        message[draw(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in ("role", "content")))] = 1
    elif kind == "empty":
        messages = []
    else:
        messages = draw(st.text(max_size=5) | st.integers() | st.lists(st.integers(), min_size=1))
    return {"messages": messages, "model": MODEL}, "messages"


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed_generate())
def test_malformed_generate_refused_before_enqueue(app: Any,
                                                   case: tuple[dict[str, Any], str]) -> None:
    kwargs, field = case
    with nothing_sent(), pytest.raises(RequestRejected) as refused:
        generate.delay(**kwargs)
    assert_names_field(refused.value, field)


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed_chat())
def test_malformed_chat_refused_before_enqueue(app: Any,
                                               case: tuple[dict[str, Any], str]) -> None:
    kwargs, field = case
    with nothing_sent(), pytest.raises(RequestRejected) as refused:
        chat.delay(**kwargs)
    assert_names_field(refused.value, field)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=malformed_generate(), position=st.integers(0, 4))
def test_malformed_item_in_a_batch_refused_naming_it(
    app: Any, bad: tuple[dict[str, Any], str], position: int
) -> None:
    item, field = bad
    item.pop("model", None)
    if field == "model":  # an item carries no model of its own: any is unknown there
        item["model"] = "x"
    items: list[dict[str, Any]] = [{"prompt": f"ok {i}"} for i in range(5)]
    items[position] = item
    with nothing_sent(), pytest.raises(RequestRejected) as refused:
        generate_many.delay(items, model=MODEL)
    assert_names_field(refused.value, f"requests.{position}.{field}")


def test_batch_helper_names_the_item_a_worker_refused(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producer import client
    from producer.tasks import ManyTask

    done = {"ok": {"text": "ok", "finish_reason": "stop", "prompt_tokens": 1,
                   "completion_tokens": 1, "total_tokens": 2, "model": MODEL, "engine_id": "e1"}}
    refused = {"error": {"type": "PromptTooLong",
                         "message": "prompt: 600 tokens, but model 'bad-input' takes at most 511 "
                                    "prompt tokens (max_model_len 512)"}}

    def answers(handles: list[Any], *args: Any) -> list[Any]:
        # What the worker answers, chunk by chunk: the 301st prompt does not fit its context.
        values = [[done] * len(request.requests) for request in handles]
        values[1][300 - 256] = refused
        return values

    monkeypatch.setattr(ManyTask, "send", lambda self, request, **options: request)
    monkeypatch.setattr(client, "_collect", answers)
    prompts = ["fine"] * 600
    with pytest.raises(PromptTooLong) as raised:
        client.generate_batch(prompts, model=MODEL, chunk_size=256)
    assert_names_field(raised.value, "prompts.300.prompt")
    in_place = client.generate_batch(prompts, model=MODEL, return_exceptions=True)
    assert [i for i, r in enumerate(in_place) if isinstance(r, PromptTooLong)] == [300]


def test_limits(app: Any) -> None:
    with nothing_sent():
        with pytest.raises(RequestRejected) as long_prompt:
            generate.delay("x" * (MAX_PROMPT_CHARS + 1), model=MODEL)
        with pytest.raises(RequestRejected) as many:
            generate_many.delay([{"prompt": "x"}] * (MAX_BATCH + 1), model=MODEL)
        with pytest.raises(RequestTooLarge, match="FLEET_MAX_MESSAGE_BYTES") as large:
            generate_many.delay([{"prompt": "x" * (MAX_PROMPT_CHARS - 1)}] * 9, model=MODEL)
    assert_names_field(long_prompt.value, "prompt")
    assert_names_field(many.value, "requests")
    assert_names_field(large.value, "request")


# --- raw messages on a real worker's queue --------------------------------------------------

QUEUE = "fleet.model.tiny-b"  # engine b1
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)
HUGE = st.builds(lambda n, c: c * n, st.integers(100_000, 2_000_000), st.sampled_from("aé😀"))
KWARGS = st.dictionaries(
    st.sampled_from(["prompt", "model", "max_tokens", "temperature", "messages", "requests",
                     "stop", "seed", "bogus"]),
    JSON | HUGE, max_size=5,
)
CELERY_HEADERS = ["lang", "task", "id", "root_id", "parent_id", "group", "retries", "eta",
                  "expires", "timelimit", "argsrepr", "kwargsrepr", "origin"]


def envelope(body: str, content_type: str, headers: dict[str, Any], task_id: str) -> bytes:
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": content_type,
        "headers": headers,
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    }).encode()


def task_headers(task: str, task_id: str) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
            "group": None, "retries": 0, "eta": None, "expires": None,
            "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "", "origin": "test"}


@st.composite
def raw_messages(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(kind, raw bytes, id of a task whose result must appear, if any)."""
    kind = draw(st.sampled_from(["bytes", "utf8", "json", "envelope", "task"]))
    if kind == "bytes":
        return kind, draw(st.binary(min_size=1, max_size=200)), None
    if kind == "utf8":
        return kind, b"\xff\xfe" + draw(st.binary(max_size=50)), None
    if kind == "json":
        return kind, json.dumps(draw(JSON)).encode(), None
    task_id = str(uuid.uuid4())
    task = draw(st.sampled_from(["fleet.generate", "fleet.chat", "fleet.generate_many"]))
    kwargs = draw(KWARGS)
    body = base64.b64encode(json.dumps([[], kwargs, {}]).encode()).decode()
    if kind == "task":  # a well-formed Celery message with arbitrary kwargs: a result appears
        return kind, envelope(body, "application/json", task_headers(task, task_id),
                              task_id), task_id
    headers = task_headers(draw(st.sampled_from([task, "fleet.nope", "os.system"])), task_id)
    for key in draw(st.sets(st.sampled_from(CELERY_HEADERS), max_size=4)):
        del headers[key]
    content_type = draw(st.sampled_from(["application/json", "application/x-python-serialize",
                                         "application/x-yaml", "text/plain"]))
    body = draw(st.sampled_from([body, "@@not base64@@", ""]))
    return kind, envelope(body, content_type, headers, task_id), None


class RawRun:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str | None]] = []
        self.result_ids: list[str] = []


def _field(raw: bytes, *path: str) -> str | None:
    """A string inside a raw envelope, or None."""
    try:
        value: Any = json.loads(raw)
        for key in path:
            value = value[key]
    except (ValueError, TypeError, KeyError):
        return None
    return value if isinstance(value, str) and value else None


def invisible(app: Any, redis_client: Any, sent: list[tuple[str, bytes, str | None]]
              ) -> list[str]:
    """The kinds of the messages in ``sent`` (kind, raw, task id) that ended nowhere: no
    result for their task id, nothing of them in ``fleet.dead.malformed``."""
    dead = redis_client.lrange(MALFORMED_QUEUE, 0, -1)
    lost = []
    for kind, raw, task_id in sent:
        tag = _field(raw, "properties", "delivery_tag")
        task_id = task_id or _field(raw, "headers", "id")
        if task_id is not None and AsyncResult(task_id, app=app).state in ("SUCCESS",
                                                                            "FAILURE"):
            continue
        if raw[:MALFORMED_KEEP_BYTES] in dead:
            continue
        if tag is not None and any(tag.encode() in entry for entry in dead):
            continue
        lost.append(kind)
    return lost


def drained(redis_client: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while redis_client.llen(QUEUE) or redis_client.hlen("unacked"):
        assert time.monotonic() < deadline, "messages left on the queue"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def raw_run(workers_ab: tuple[WorkerProc, WorkerProc], app: Any, redis_client: Any) -> Any:
    run = RawRun()
    yield run
    b1 = workers_ab[1]
    drained(redis_client)
    assert b1.process.poll() is None
    for task_id in run.result_ids:  # well-formed messages end in a stored result
        result = AsyncResult(task_id, app=app)
        result.get(timeout=60, propagate=False)
        assert result.state in ("SUCCESS", "FAILURE")
        if result.state == "FAILURE":
            assert type(result.result).__name__ in ("InvalidRequest", "UnknownModel",
                                                    "PromptTooLong")
    assert len(run.sent) >= 200
    assert invisible(app, redis_client, run.sent) == []  # every message ended somewhere


@pytest.mark.engine
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(message=raw_messages())
def test_raw_malformed_messages_on_the_queue(raw_run: RawRun, redis_client: Any,
                                             message: tuple[str, bytes, str | None]) -> None:
    kind, raw, task_id = message
    redis_client.lpush(QUEUE, raw)
    raw_run.sent.append((kind, raw, task_id))
    if task_id is not None:
        raw_run.result_ids.append(task_id)
    good = generate.delay("still here?", model="tiny-b", max_tokens=2)
    assert good.get(timeout=60)["completion_tokens"] == 2


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.engine
def test_messages_celery_cannot_run_end_in_a_result_or_the_dead_letters(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any, redis_client: Any
) -> None:
    ids = {kind: str(uuid.uuid4()) for kind in ("utf8", "kwargs", "builtin", "args")}
    ok = _b64(json.dumps([[], {"prompt": "hi", "model": "tiny-b"}, {}]).encode())
    cases = {
        "utf8": envelope(_b64(b"\xff\xfe[[], {}, {}]"), "application/json",
                         task_headers("fleet.generate", ids["utf8"]), ids["utf8"]),
        "kwargs": envelope(_b64(json.dumps([[], "prompt=hi", {}]).encode()), "application/json",
                           task_headers("fleet.generate", ids["kwargs"]), ids["kwargs"]),
        "args": envelope(_b64(json.dumps("not a list").encode()), "application/json",
                         task_headers("fleet.generate", ids["args"]), ids["args"]),
        "null-id": envelope(ok, "application/json",
                            {**task_headers("fleet.generate", ""), "id": None}, ""),
        "null-id-unknown": envelope(ok, "application/json",
                                    {**task_headers("fleet.nope", ""), "id": None}, ""),
        "no-headers": envelope(ok, "application/json", {}, ""),
        "builtin": envelope(_b64(json.dumps([[], {}, {}]).encode()), "application/json",
                            task_headers("celery.backend_cleanup", ids["builtin"]),
                            ids["builtin"]),
    }
    for raw in cases.values():
        redis_client.lpush(QUEUE, raw)
    good = generate.delay("after them", model="tiny-b", max_tokens=2)
    assert good.get(timeout=60)["completion_tokens"] == 2
    drained(redis_client)
    sent = [(kind, raw, ids.get(kind)) for kind, raw in cases.items()]
    assert invisible(app, redis_client, sent) == []
    for kind, task_id in ids.items():  # a task id named: its caller hears why
        result = AsyncResult(task_id, app=app)
        assert result.state == "FAILURE", kind
    assert type(AsyncResult(ids["builtin"], app=app).result).__name__ == "NotRegistered"
    assert workers_ab[1].process.poll() is None


class _Touch:
    """Unpickling this creates a file: the proof that a pickle was (not) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.touch, (self.path,))


@pytest.mark.engine
def test_pickled_message_is_refused(workers_ab: tuple[WorkerProc, WorkerProc],
                                    redis_client: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    task_id = str(uuid.uuid4())
    body = base64.b64encode(pickle.dumps(((), {"prompt": _Touch(marker)}, {}))).decode()
    redis_client.lpush(QUEUE, envelope(body, "application/x-python-serialize",
                                       task_headers("fleet.generate", task_id), task_id))
    assert generate.delay("after the pickle", model="tiny-b", max_tokens=2).get(timeout=60)
    deadline = time.monotonic() + 30
    while "Refusing to deserialize untrusted content of type pickle" not in workers_ab[1].log():
        assert time.monotonic() < deadline, "the worker did not refuse the pickle"
        time.sleep(0.2)
    assert not marker.exists()
    assert workers_ab[1].process.poll() is None
