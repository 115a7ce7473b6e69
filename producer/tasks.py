"""Task signatures for ``.delay()``: validated and routed by model before anything is enqueued.

The bodies run only inside a fleet worker, whose engine bootstep gives each fleet task the
executor that hands a request to its engine (``ModelTask.executor``); most messages do not even
reach a body there, they are served in micro-batches (``workers/batcher.py``). Tasks are
declared lazily, so importing this module reads no settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from celery import Task
from celery.result import AsyncResult
from pydantic import BaseModel

from producer import naming
from producer.celery_app import app
from producer.errors import InvalidRequest, RequestTooLarge
from producer.schema import (
    PRIORITY_LEVELS,
    SAMPLING_FIELDS,
    ChatRequest,
    GenerateRequest,
    ManyRequest,
    Sampling,
    StatusRequest,
    WarmupRequest,
    parse,
    to_wire,
)
from producer.settings import get_settings


class ModelTask(Task):
    """A task for one model: the call is validated, then sent to ``fleet.model.<model>``."""

    schema: ClassVar[type[BaseModel]]
    #: Runs the body in a fleet worker (set there on the app's task; None elsewhere).
    executor: Callable[[ModelTask, dict[str, Any]], Any] | None = None
    #: Names of the positional arguments, in order (the rest are keyword-only).
    positional: ClassVar[tuple[str, ...]]
    #: The priority of a call that names none (``producer.schema.PRIORITY_LEVELS``).
    default_priority: ClassVar[int] = PRIORITY_LEVELS["default"]
    typing = False  # the schema checks the signature, with clearer errors

    def validate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The validated request of a call, or InvalidRequest naming the field."""
        return parse(self.schema, self.named(args, kwargs))

    def named(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments by name (a message from any Celery producer may use positions)."""
        if len(args) > len(self.positional):
            raise InvalidRequest(
                f"{self.name} takes {len(self.positional)} positional argument(s) "
                f"({', '.join(self.positional)}); pass the rest by keyword"
            )
        data = dict(zip(self.positional, args, strict=False))
        for key in data.keys() & kwargs.keys():
            raise InvalidRequest(f"{key}: given both positionally and by keyword")
        return {**data, **kwargs} if data else kwargs

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        kwargs = dict(kwargs or {})
        if "params" in kwargs and issubclass(self.schema, Sampling):
            # Expanded before validation: the wire carries the fields, never a params object.
            kwargs = with_params(kwargs.pop("params"), kwargs)
        if "priority" in options and "priority" in self.schema.model_fields:
            # Celery's own option names the same thing: one value, checked like the field.
            given = options.pop("priority")
            if given is not None and kwargs.setdefault("priority", given) != given:
                raise InvalidRequest(f"priority: given as {kwargs['priority']!r} and as the "
                                     f"apply_async option {given!r}; give it once")
        return self.send(self.validate(tuple(args or ()), kwargs), **options)

    def send(self, request: Any, **options: Any) -> AsyncResult:
        """Enqueue an already validated request on its model's queue."""
        if "queue" not in options:
            options["queue"] = naming.model_queue(request.model)
        wire = to_wire(request)
        level = getattr(request, "priority", None)
        if level is None:
            level = self.default_priority
            if "priority" in type(request).model_fields:
                wire["priority"] = level  # the worker hands the engine what the queue used
        # Kombu's Redis transport keeps each priority step in a list of its own, taken in
        # order (producer/transport.py); the message carries it through redeliveries.
        options["priority"] = level
        check_size(wire)
        # What Flower and the worker's logs show of the call. Celery would build the same with
        # its saferepr, about a tenth of a millisecond of each .delay(); a plain repr does.
        options.setdefault("argsrepr", "()")
        options.setdefault("kwargsrepr", short_repr(wire))
        options["headers"] = {**(options.get("headers") or {}),
                              naming.SENT_AT_HEADER: time.time()}
        return super().apply_async((), wire, **options)

    def execute(self, kwargs: dict[str, Any]) -> Any:
        if self.executor is None:
            raise RuntimeError(f"{self.name} runs only inside a fleet worker (fleet worker ...)")
        return self.executor(self, kwargs)


class GenerateTask(ModelTask):
    """``generate.delay(prompt, model=..., params=..., **sampling)``: complete a prompt."""

    schema = GenerateRequest
    positional = ("prompt",)


class ChatTask(ModelTask):
    """``chat.delay(messages, model=..., params=..., **sampling)``: answer a conversation."""

    schema = ChatRequest
    positional = ("messages",)


class ManyTask(ModelTask):
    """Many requests of one kind in one message: one round trip for the whole chunk."""

    schema = ManyRequest
    positional = ("requests",)
    default_priority = PRIORITY_LEVELS["batch"]
    item_schema: ClassVar[type[GenerateRequest] | type[ChatRequest]]

    def validate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ManyRequest:
        envelope: ManyRequest = super().validate(args, kwargs)
        items = []
        for i, item in enumerate(envelope.requests):
            if "model" in item:
                raise InvalidRequest(f"requests.{i}.model: items share the batch's model; "
                                     f"leave it out")
            if "priority" in item:
                raise InvalidRequest(f"requests.{i}.priority: items share the batch's "
                                     f"priority; set it on the call")
            if item.get("stream"):
                raise InvalidRequest(f"requests.{i}.stream: items of a many-request are not "
                                     f"streamed; send the requests one by one to stream them")
            try:
                request = parse(self.item_schema, {**item, "model": envelope.model})
            except InvalidRequest as e:
                raise InvalidRequest(f"requests.{i}: {e}") from None
            items.append(item_wire(request))
        return ManyRequest(requests=items, model=envelope.model, priority=envelope.priority)


class GenerateManyTask(ManyTask):
    """``generate_many.delay([{"prompt": ...}, ...], model=...)``: complete many prompts."""

    item_schema = GenerateRequest


class ChatManyTask(ManyTask):
    """``chat_many.delay([{"messages": [...]}, ...], model=...)``: answer many conversations."""

    item_schema = ChatRequest


class WarmupTask(ModelTask):
    """``warmup.delay(model)``: an engine of the model loads (if idle-unloaded) and reports."""

    schema = WarmupRequest
    positional = ("model",)
    default_priority = PRIORITY_LEVELS["interactive"]  # an engine to load comes first


class EngineStatusTask(ModelTask):
    """``engine_status.delay(engine_id)``: that engine reports its status, via its own queue."""

    schema = StatusRequest
    positional = ("engine_id",)
    default_priority = PRIORITY_LEVELS["interactive"]

    def send(self, request: Any, **options: Any) -> AsyncResult:
        options.setdefault("queue", naming.engine_queue(request.engine_id))
        return super().send(request, **options)


#: Longest repr of arguments or a result in a message or event (Celery's ``*repr_maxsize``).
REPR_MAX = 1024


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to ``REPR_MAX`` characters."""
    text = repr(value)
    return text if len(text) <= REPR_MAX else text[:REPR_MAX - 3] + "..."


def check_size(wire: dict[str, Any]) -> None:
    """Refuse a request whose message body would be above ``max_message_bytes``."""
    limit = get_settings().max_message_bytes
    size = len(json.dumps(wire, ensure_ascii=False).encode())
    if size > limit:
        raise RequestTooLarge(
            f"request: its message is {size} bytes, above the fleet's limit of {limit} "
            f"(FLEET_MAX_MESSAGE_BYTES); send fewer or shorter requests per call"
        )


def with_params(params: Sampling | Mapping[str, Any] | None,
                keywords: dict[str, Any]) -> dict[str, Any]:
    """``keywords`` over the sampling fields ``params`` sets: a Sampling, or a mapping of its
    fields (validated as one); InvalidRequest naming ``params`` otherwise."""
    if params is None:
        return keywords
    if isinstance(params, Sampling):
        # Only its sampling fields: a request (a Sampling too) passed as params brings no prompt.
        params = params.model_dump(include=set(SAMPLING_FIELDS), exclude_unset=True)
    if not isinstance(params, Mapping):
        raise InvalidRequest(f"params: a producer.Sampling or a mapping of sampling fields, "
                             f"not {type(params).__name__} (got {params!r:.80})")
    try:
        # Checked here, even a Sampling (model_construct skips validation), so that an error
        # says the bad field came from params.
        base = parse(Sampling, dict(params))
    except InvalidRequest as e:
        raise InvalidRequest(f"params: {e}") from None
    return {**base.model_dump(exclude_unset=True, exclude_none=True), **keywords}


def item_wire(request: GenerateRequest | ChatRequest) -> dict[str, Any]:
    """One item of a many-request on the wire: the fields set, less the shared model."""
    wire = to_wire(request)
    del wire["model"]
    return wire


@app.task(base=GenerateTask, bind=True, name=naming.GENERATE_TASK)
def generate(self: GenerateTask, **kwargs: Any) -> Any:
    """Complete a prompt on the model's engine."""
    return self.execute(kwargs)


@app.task(base=ChatTask, bind=True, name=naming.CHAT_TASK)
def chat(self: ChatTask, **kwargs: Any) -> Any:
    """Answer a conversation on the model's engine."""
    return self.execute(kwargs)


@app.task(base=GenerateManyTask, bind=True, name=naming.GENERATE_MANY_TASK)
def generate_many(self: GenerateManyTask, **kwargs: Any) -> Any:
    """Complete many prompts in one message; a list of ItemResult, in order."""
    return self.execute(kwargs)


@app.task(base=ChatManyTask, bind=True, name=naming.CHAT_MANY_TASK)
def chat_many(self: ChatManyTask, **kwargs: Any) -> Any:
    """Answer many conversations in one message; a list of ItemResult, in order."""
    return self.execute(kwargs)


@app.task(base=WarmupTask, bind=True, name=naming.WARMUP_TASK)
def warmup(self: WarmupTask, **kwargs: Any) -> Any:
    """Load and warm an engine of the model; its health report."""
    return self.execute(kwargs)


@app.task(base=EngineStatusTask, bind=True, name=naming.ENGINE_STATUS_TASK)
def engine_status(self: EngineStatusTask, **kwargs: Any) -> Any:
    """One engine's status, as ``fleet engines`` shows it."""
    return self.execute(kwargs)
