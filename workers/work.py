"""A serving task as the engine sees it, and the engine's outputs as the task's result.

:class:`Planner` validates a task's arguments, applies the model's defaults and limits, and
plans its requests for the engine (:class:`Work`); once they are done, ``Work.answer`` reads
the outputs back into the task's result (tool calls and JSON through :mod:`workers.replies`).
Both paths of a worker use it: the micro-batch path (``workers/batcher.py``) and Celery's
ordinary one (``Runtime.execute``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from producer.errors import FleetError, InvalidRequest, UnknownModel
from producer.schema import (
    DEFAULT_MAX_TOKENS,
    PRIORITY_LEVELS,
    SAMPLING_FIELDS,
    ChatRequest,
    GenerateRequest,
    ManyRequest,
    Sampling,
    parse,
)
from producer.settings import ModelConfig
from producer.tasks import ManyTask
from workers import replies
from workers.engines import EngineOutput, EngineRequest
from workers.replies import Reply
from workers.revoke import is_revoked


class Revoked(Exception):
    """The task was revoked while its requests were in the engine; they were aborted."""


@dataclass(frozen=True, slots=True)
class Work:
    """A serving task's requests for the engine, and how its result is read from their
    outputs once all are done (``answer`` raises the task's error, if it has one)."""

    requests: list[EngineRequest]
    answer: Callable[[Sequence[Future[EngineOutput]]], Any]


def check_revoked(task_id: str, futures: Sequence[Future[EngineOutput]]) -> None:
    """Raise Revoked if the task's requests were aborted because it was revoked."""
    aborted = any(f.exception() is None and f.result().finish_reason == "abort"
                  for f in futures)
    if aborted and is_revoked(task_id):
        raise Revoked(f"task {task_id} was revoked; its requests were aborted")


def item_result(outcome: dict[str, Any] | FleetError) -> dict[str, Any]:
    """One entry of a many-request's result (the shape of ``producer.schema.ItemResult``)."""
    if isinstance(outcome, FleetError):
        return {"error": {"type": type(outcome).__name__, "message": str(outcome)}}
    return {"ok": outcome}


_SAMPLING = set(SAMPLING_FIELDS)  # pydantic's include takes a set


class Planner:
    """Plans the engine requests of one model's serving tasks and reads back their results."""

    def __init__(self, model_id: str, engine_id: str, config: ModelConfig,
                 stream_opener: Callable[[str], Callable[[str], None]] | None = None) -> None:
        self.model_id = model_id
        self.engine_id = engine_id
        self.config = config
        #: The text callback of a streaming task, by task id (``StreamWriter.opener``); None:
        #: this worker publishes no streams.
        self.stream_opener = stream_opener
        self._defaults = config.defaults.model_dump(exclude_none=True)  # the model's knobs

    def prepare(self, task: Any, task_id: str, kwargs: dict[str, Any]) -> Work:
        """A serving task's requests for the engine; raises FleetError if the task is invalid."""
        if isinstance(task, ManyTask):
            return self.prepare_many(task.item_schema, task_id, kwargs)
        return self.prepare_one(task.schema, task_id, kwargs)

    def prepare_one(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                    kwargs: dict[str, Any]) -> Work:
        validated = parse(schema, kwargs)
        # A message from a producer that named no priority waits as the task's default.
        priority = validated.priority
        request, reply = self._engine_request(
            validated, task_id, PRIORITY_LEVELS["default"] if priority is None else priority)
        # A reply with tool calls is read from the whole text: it comes whole, in the result.
        if (validated.stream and self.stream_opener is not None
                and (reply is None or reply.tool_choice == "none")):
            request = replace(request, on_text=self.stream_opener(task_id))

        def answer(futures: Sequence[Future[EngineOutput]]) -> dict[str, Any]:
            return self._completion(futures[0].result(), request.request_id, reply)

        return Work([request], answer)

    def prepare_many(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                     kwargs: dict[str, Any]) -> Work:
        envelope = parse(ManyRequest, kwargs)
        priority = PRIORITY_LEVELS["batch"] if envelope.priority is None else envelope.priority
        outcomes: list[FleetError | None] = []
        valid: list[EngineRequest] = []
        reading: list[Reply | None] = []
        for i, item in enumerate(envelope.requests):
            try:
                request = parse(schema, {**item, "model": envelope.model})
                if request.stream:
                    raise InvalidRequest("stream: items of a many-request are not streamed")
                sent, reply = self._engine_request(request, f"{task_id}:{i}", priority)
                valid.append(sent)
                reading.append(reply)
                outcomes.append(None)
            except FleetError as e:
                outcomes.append(e)

        def answer(futures: Sequence[Future[EngineOutput]]) -> list[dict[str, Any]]:
            done = iter(zip(valid, reading, futures, strict=True))
            results = []
            for outcome in outcomes:
                result: dict[str, Any] | FleetError | None = outcome
                if result is None:
                    try:
                        sent, reply, future = next(done)
                        result = self._completion(future.result(), sent.request_id, reply)
                    except FleetError as e:
                        result = e
                results.append(item_result(result))
            return results

        return Work(valid, answer)

    def _engine_request(self, request: GenerateRequest | ChatRequest, request_id: str,
                        priority: int) -> tuple[EngineRequest, Reply | None]:
        if request.model != self.model_id:
            raise UnknownModel(
                f"model: engine {self.engine_id!r} serves {self.model_id!r}, not {request.model!r}"
            )
        # Tools and JSON output add to what the engine sees: workers/replies.py.
        sent, reply = replies.engine_request(request, request_id, self._sampling(request),
                                             self.config)
        return replace(sent, priority=priority), reply

    def _completion(self, out: EngineOutput, request_id: str,
                    reply: Reply | None) -> dict[str, Any]:
        completion = {
            "text": out.text,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "model": self.model_id,
            "engine_id": self.engine_id,
        }
        return replies.finish(completion, out, request_id, reply, self.config)  # tools, JSON

    def _sampling(self, request: Sampling) -> dict[str, Any]:
        given = request.model_dump(include=_SAMPLING, exclude_none=True)
        sampling = {**self._defaults, **given}
        cap = self.config.max_tokens_cap
        # vLLM's own default when nobody set one, held to the cap like any other value.
        sampling.setdefault("max_tokens", min(DEFAULT_MAX_TOKENS, cap))
        if sampling["max_tokens"] > cap:
            raise InvalidRequest(
                f"max_tokens: {sampling['max_tokens']} is above model {self.model_id!r}'s "
                f"cap of {cap} (max_tokens_cap)"
            )
        return sampling
