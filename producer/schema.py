"""The wire schema: what a task carries to a worker and what comes back.

One module for both sides. Field names follow OpenAI and vLLM (``max_tokens``, ``temperature``,
``stop``, ``seed``), so mapping a request onto ``vllm.SamplingParams`` is one function. Only the
fields a caller set travel on the wire; the worker fills the rest from the model's defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from producer.errors import InvalidRequest
from producer.naming import ID_PATTERN

# Hard limits of the wire format; a model's own limits (context length) are checked by its worker.
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKENS_LIMIT = 131_072
MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 1_024
MAX_BATCH = 1_024

ModelId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=1_000)]


class _Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True
    )


class Sampling(_Frozen):
    """Per-call sampling knobs, same names and meaning as ``vllm.SamplingParams``."""

    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    """Randomness of sampling; 0 picks the most likely token every time (greedy)."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Sample only from the smallest set of tokens whose probabilities add up to top_p."""
    top_k: Annotated[int, Field(ge=-1)] | None = None
    """Sample only from the top_k most likely tokens; 0 or -1 turns it off."""
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    """Most tokens to generate; the model's worker may cap it further."""
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    """Above 1 discourages tokens already in the prompt or output; 1 is neutral."""
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    """Penalises tokens that already appeared in the output, once each."""
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    """Penalises tokens by how often they already appeared in the output."""
    stop: (
        StopSequence
        | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
    """Strings that end generation when produced; they are not part of the text."""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    """Seed of this request's sampler: the same seed and prompt give the same text."""


class GenerateRequest(Sampling):
    """A plain-text completion request (task ``fleet.generate``)."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
    """The text to continue."""
    model: ModelId
    """Id of the model (and so of the queue) that serves the request."""


class ChatMessage(_Frozen):
    """One message of a conversation, OpenAI's shape."""

    role: Literal["system", "user", "assistant", "tool"]
    """Who wrote the message."""
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
    """The message text."""


class ChatRequest(Sampling):
    """A chat request rendered through the model's chat template (task ``fleet.chat``)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    """The conversation so far; the reply continues it as the assistant."""
    model: ModelId
    """Id of the model (and so of the queue) that serves the request."""


class ManyRequest(_Frozen):
    """Many requests of one kind for one model in one message (``fleet.*_many`` tasks).

    Items are checked one by one on both sides, so a bad item fails only itself; they carry
    the fields of a GenerateRequest or ChatRequest except ``model``.
    """

    requests: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH)]
    """The requests, in order; results come back in the same order."""
    model: ModelId
    """Id of the model (and so of the queue) that serves every request."""


class WarmupRequest(_Frozen):
    """Make sure an engine of a model is loaded and warm (task ``fleet.warmup``)."""

    model: ModelId
    """The model; whichever of its engines takes the task loads itself if it was unloaded."""


class StatusRequest(_Frozen):
    """Report one engine's status (task ``fleet.engine_status``, on that engine's own queue)."""

    engine_id: ModelId
    """The engine to ask."""


class ItemError(_Frozen):
    """Why one item of a many-request failed."""

    type: str
    """Name of the error class in ``producer.errors`` (e.g. ``PromptTooLong``)."""
    message: str
    """The error message, naming the field at fault."""


class Completion(_Frozen):
    """The result of a generate or chat task, as stored in the result backend."""

    text: str
    """The generated text (stop strings excluded)."""
    finish_reason: Literal["stop", "length", "abort"]
    """``stop``: end of sequence or a stop string; ``length``: max_tokens or the context ran out."""
    prompt_tokens: int
    """Tokens in the prompt as the model saw it (after the chat template)."""
    completion_tokens: int
    """Tokens generated."""
    total_tokens: int
    """prompt_tokens + completion_tokens."""
    model: str
    """Id of the model that served the request."""
    engine_id: str
    """Id of the engine that served the request."""


class ItemResult(_Frozen):
    """The outcome of one item of a many-request: a completion or an error."""

    ok: Completion | None = None
    """The completion, if the item succeeded."""
    error: ItemError | None = None
    """The error, if it failed."""


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse(schema: type[RequestT], data: dict[str, Any]) -> RequestT:
    """Validate ``data`` against ``schema``; raise InvalidRequest naming every bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(describe(schema, e)) from None


def describe(schema: type[BaseModel], error: ValidationError) -> str:
    """One line per bad field, e.g. ``temperature: Input should be >= 0 (got -1)``."""
    lines = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "(request)"
        got = repr(item.get("input"))
        if len(got) > 80:
            got = got[:77] + "..."
        lines.append(f"{field}: {item['msg']} (got {got})")
    return f"invalid {schema.__name__}: " + "; ".join(lines)


def to_wire(request: BaseModel) -> dict[str, Any]:
    """The JSON-ready kwargs of a task: only the fields the caller set."""
    return request.model_dump(mode="json", exclude_unset=True)
