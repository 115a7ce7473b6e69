"""The wire schema: what a task carries to a worker and what comes back.

One module for both sides. Field names follow OpenAI and vLLM (``max_tokens``, ``temperature``,
``stop``, ``seed``), so mapping a request onto ``vllm.SamplingParams`` is one function. Only the
fields a caller set travel on the wire; the worker fills the rest from the model's defaults.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema
from pydantic_core.core_schema import UnionSchema

from producer import errors
from producer.errors import FleetError, InvalidRequest
from producer.explain import describe
from producer.naming import ID_PATTERN, MODEL_ID_PATTERN

# Hard limits of the wire format; a model's own limits (context length) are checked by its worker.
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKENS_LIMIT = 131_072
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1_000
MAX_MESSAGES = 1_024
MAX_BATCH = 1_024
MAX_TOOLS = 128  # OpenAI's limit
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_TOKEN_IDS = 1_024

ModelId = Annotated[str, StringConstraints(pattern=MODEL_ID_PATTERN)]
EngineId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS)]


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse anything that is not itself a valid JSON schema (Draft 2020-12 metaschema)."""
    from jsonschema import Draft202012Validator  # here: only callers that send schemas pay for it
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"not a valid JSON schema (Draft 2020-12) at {where}: {e.message}") \
            from None
    return schema


def _check_parameters(schema: dict[str, Any]) -> dict[str, Any]:
    check_json_schema(schema)
    # A call's arguments are one JSON object (OpenAI's rule), so its schema describes an object.
    if schema.get("type", "object") != "object":
        raise ValueError(f"the parameters of a function must be an object schema, not "
                         f"type {schema['type']!r}")
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(check_json_schema)]


def one_error(allowed: str) -> GetPydanticSchema:
    """Make a union type fail with one error saying what is ``allowed``.

    Pydantic reports a value no member accepts once per member, each under a generated name
    (``stop.list[constrained-str]``); the one error is pydantic-core's own, so a valid value
    costs nothing more.
    """

    def schema(source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        union = cast(UnionSchema, handler(source))
        if union["type"] != "union":
            raise TypeError(f"one_error() applies to a union type, not {union['type']}")
        union["custom_error_type"] = "not_allowed"
        union["custom_error_message"] = allowed
        return union

    return GetPydanticSchema(schema)


class _Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True
    )


class Sampling(_Frozen):
    """Per-call sampling knobs, same names and meaning as ``vllm.SamplingParams``."""

    # NaN or infinity would fail a bound's check with a message about the bound ("less than or
    # equal to 100"); refused as not finite, the message says what is wrong with the value.
    model_config = ConfigDict(allow_inf_nan=False)

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
        Annotated[
            StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)],
            one_error(f"a string or a list of at most {MAX_STOP_SEQUENCES} strings, each of 1 "
                      f"to {MAX_STOP_CHARS:,} characters"),
        ]
        | None
    ) = None
    """Strings that end generation when produced; they are not part of the text."""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    """Seed of this request's sampler: the same seed and prompt give the same text."""

    # vLLM sampling extras: the allow-list of further ``vllm.SamplingParams`` fields a call may
    # set (what vLLM's OpenAI server takes as extra_body). Nothing else reaches the engine.
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = None
    """Fewest tokens to generate before end of sequence or a stop string may end the text."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Drop tokens less likely than min_p times the most likely one; 0 turns it off."""
    ignore_eos: bool | None = None
    """Keep generating past the end-of-sequence token (up to max_tokens)."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Return each generated token's log-probability and this many most likely alternatives."""
    stop_token_ids: TokenIds | None = None
    """Token ids that end generation when produced (besides end of sequence)."""
    include_stop_str_in_output: bool | None = None
    """Keep the stop string that ended generation in the text."""
    skip_special_tokens: bool | None = None
    """Leave special tokens out of the text (vLLM's default: true)."""
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")],
                Annotated[float, Field(ge=-100.0, le=100.0)],
            ],
            Field(max_length=MAX_TOKEN_IDS),
        ]
        | None
    ) = None
    """Added to the logits of these token ids (keys: token ids as strings, OpenAI's shape)."""
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=2**20)] | None = (
        None
    )
    """Generate only these token ids."""
    bad_words: Annotated[list[StopSequence], Field(max_length=MAX_TOKEN_IDS)] | None = None
    """Words never to generate."""

    @field_validator("min_tokens")
    @classmethod
    def _min_below_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        high = info.data.get("max_tokens")
        if value is not None and high is not None and value > high:
            raise ValueError(f"min_tokens ({value}) is above max_tokens ({high})")
        return value


class JsonSchemaFormat(_Frozen):
    """The ``json_schema`` member of a ``response_format`` (OpenAI's shape)."""

    model_config = ConfigDict(serialize_by_alias=True)

    name: FunctionName
    """Name of the schema."""
    description: Annotated[str, StringConstraints(max_length=10_000)] | None = None
    """What the answer is for."""
    schema_: JsonSchema = Field(alias="schema")
    """The JSON schema the answer must satisfy (checked against the Draft 2020-12 metaschema)."""
    strict: bool | None = None
    """Accepted for OpenAI compatibility: generation always follows the schema strictly."""


class ResponseFormat(_Frozen):
    """What the text must be: free text, any JSON object, or JSON satisfying a schema."""

    type: Literal["text", "json_object", "json_schema"]
    """``text`` (no constraint), ``json_object`` or ``json_schema``."""
    json_schema: JsonSchemaFormat | None = None
    """The schema, for type ``json_schema``."""

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> Any:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: given exactly when type is 'json_schema'")
        return self


class JsonOutput(_Frozen):
    """Constraints on the text: the result then carries the parsed JSON as well (``parsed``)."""

    response_format: ResponseFormat | None = None
    """OpenAI's response_format: ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}``; generation is constrained to match."""
    return_json: bool | None = None
    """True: the text is one JSON object (the same as response_format json_object)."""

    @field_validator("return_json")
    @classmethod
    def _one_json_request(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        fmt = info.data.get("response_format")
        if value and fmt is not None and fmt.type != "json_object":
            raise ValueError(f"return_json=True contradicts response_format type {fmt.type!r}")
        return value

    def json_format(self) -> ResponseFormat | None:
        """The JSON constraint asked for, if any."""
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format
        return ResponseFormat(type="json_object") if self.return_json else None


class Streaming(_Frozen):
    """Whether the caller follows the text as it is generated."""

    stream: bool | None = None
    """True: the worker publishes the text as it is generated, to the Redis stream
    ``fleet.stream.<task id>`` (read it with ``producer.client.stream_generate``/``stream_chat``
    or the gateway's ``stream: true``). A reply with tool calls comes whole at the end."""


#: The named priority levels (lower is sooner, as in vLLM and kombu's Redis transport).
#: Interactive callers go ahead of everything; the batch helpers and many-request tasks send at
#: ``batch`` unless told otherwise; a call that names no priority is at ``default``.
PRIORITY_LEVELS: dict[str, int] = {"interactive": 0, "default": 5, "batch": 9}
#: The lowest priority (highest value) a request may have: kombu's Redis transport keeps
#: priorities 0 to 9.
MAX_PRIORITY = 9


def priority_value(value: Any) -> Any:
    """A level's name as its number; refuses what is neither a level nor an integer."""
    if isinstance(value, str):
        if value in PRIORITY_LEVELS:
            return PRIORITY_LEVELS[value]
        raise ValueError(f"{value!r} is not a level: an integer from 0 (soonest) to "
                         f"{MAX_PRIORITY} (latest), or one of {', '.join(PRIORITY_LEVELS)}")
    return value


Priority = Annotated[int, Field(ge=0, le=MAX_PRIORITY), BeforeValidator(priority_value)]


class Scheduling(_Frozen):
    """Where a request stands against other requests waiting for the same model."""

    priority: Priority | None = None
    """0 (soonest) to 9, or ``interactive`` (0), ``default`` (5), ``batch`` (9): a request is
    taken from its model's queue, and scheduled by the engine, before every request of a higher
    value waiting there. None: ``default`` (``batch`` for many-requests and the batch
    helpers)."""


#: The sampling fields of every request: named as vLLM's ``SamplingParams`` fields, so the
#: worker hands each set one to vLLM under its own name (workers/engines/vllm_options.py).
SAMPLING_FIELDS = frozenset(Sampling.model_fields)
#: What vLLM generates when a request sets no ``max_tokens`` (``SamplingParams``' default).
DEFAULT_MAX_TOKENS = 16


class GenerateRequest(Sampling, JsonOutput, Streaming, Scheduling):
    """A plain-text completion request (task ``fleet.generate``)."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
    """The text to continue."""
    model: ModelId
    """Id of the model (and so of the queue) that serves the request."""


class FunctionCall(_Frozen):
    """The function a tool call calls, and its arguments."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    """Name of the function."""
    arguments: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
    """The arguments, a JSON object as a string (OpenAI's shape)."""


class ToolCall(_Frozen):
    """One tool call of an assistant message or a result, OpenAI's shape."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    """Id of the call; the ``tool`` message answering it carries it as ``tool_call_id``."""
    type: Literal["function"] = "function"
    """Always ``function``."""
    function: FunctionCall
    """What is called."""


class ChatMessage(_Frozen):
    """One message of a conversation, OpenAI's shape."""

    role: Literal["system", "user", "assistant", "tool"]
    """Who wrote the message."""
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None
    """The message text; null only in an assistant message that calls tools."""
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    """The tools an assistant message called."""
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    """In a ``tool`` message: the id of the call it answers."""

    @model_validator(mode="before")
    @classmethod
    def _content_may_be_left_out_beside_tool_calls(cls, data: Any) -> Any:
        # OpenAI accepts an assistant tool-call message without "content".
        if isinstance(data, dict) and data.get("tool_calls") and "content" not in data:
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> Any:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages call tools")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only tool messages answer a tool call")
        if self.content is None and not self.tool_calls:
            raise ValueError("content: null only in an assistant message with tool_calls")
        for i, call in enumerate(self.tool_calls or ()):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool_calls.{i}.function.arguments: not a JSON object")
        return self


class FunctionDefinition(_Frozen):
    """A function a model may call, OpenAI's shape."""

    name: FunctionName
    """Name the model calls it by (letters, digits, _ and -, at most 64)."""
    description: Annotated[str, StringConstraints(max_length=10_000)] | None = None
    """What it does, for the model."""
    parameters: Annotated[dict[str, Any], AfterValidator(_check_parameters)] | None = None
    """JSON schema of its arguments object (checked against the Draft 2020-12 metaschema);
    none: it takes no arguments."""
    strict: bool | None = None
    """Accepted for OpenAI compatibility; forced calls always follow the schema strictly."""


class Tool(_Frozen):
    """A tool offered to the model, OpenAI's shape."""

    type: Literal["function"]
    """Always ``function``."""
    function: FunctionDefinition
    """The function."""


class FunctionChoice(_Frozen):
    """The function a named tool_choice forces."""

    name: FunctionName
    """Its name; it must be among the tools offered."""


class NamedToolChoice(_Frozen):
    """Force a call of one function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    """Always ``function``."""
    function: FunctionChoice
    """The function to call."""


class ChatRequest(Sampling, JsonOutput, Streaming, Scheduling):
    """A chat request rendered through the model's chat template (task ``fleet.chat``)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    """The conversation so far; the reply continues it as the assistant."""
    model: ModelId
    """Id of the model (and so of the queue) that serves the request."""
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    """Functions the model may call (OpenAI's shape); the chat template shows them to it."""
    tool_choice: (
        Annotated[
            Literal["auto", "none", "required"] | NamedToolChoice,
            one_error("'auto', 'none', 'required' or "
                      "{'type': 'function', 'function': {'name': <the name of a tool>}}"),
        ]
        | None
    ) = None
    """``auto`` (default with tools): the model decides; ``none``: no call; ``required``: at
    least one call; a named function: exactly that call. Forced calls are generated under a
    JSON-schema constraint, so their arguments satisfy the function's parameters."""
    parallel_tool_calls: bool | None = None
    """False: at most one call per reply. Default true."""

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        for name in {n for n in names if names.count(n) > 1}:
            raise ValueError(f"function {name!r} is offered twice")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice in (None, "auto", "none"):
            return choice
        if "tools" not in info.data:
            return choice  # tools failed validation; that error is reported
        names = {tool.function.name for tool in info.data["tools"] or ()}
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"function {choice.function.name!r} is not among the tools offered "
                             f"({sorted(names)})")
        if not names:
            raise ValueError(f"{choice!r} needs tools")
        if info.data.get("return_json") or info.data.get("response_format") is not None:
            raise ValueError("a forced tool call cannot also ask for response_format or "
                             "return_json (its arguments are already JSON)")
        return choice


class ManyRequest(Scheduling):
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

    engine_id: EngineId
    """The engine to ask."""


class ItemError(_Frozen):
    """Why one item of a many-request failed."""

    type: str
    """Name of the error class in ``producer.errors`` (e.g. ``PromptTooLong``)."""
    message: str
    """The error message, naming the field at fault."""


class TopLogprob(_Frozen):
    """One candidate token at a position of the output."""

    token: str
    """The token's text."""
    token_id: int | None = None
    """The token's id (None from a remote engine: OpenAI's API reports tokens as text)."""
    logprob: float
    """Its log-probability."""


class TokenLogprob(TopLogprob):
    """One generated token with its log-probability and the most likely alternatives."""

    top_logprobs: list[TopLogprob]
    """The ``logprobs`` most likely tokens at this position."""


class Completion(_Frozen):
    """The result of a generate or chat task, as stored in the result backend."""

    text: str
    """The generated text (stop strings excluded)."""
    finish_reason: Literal["stop", "length", "abort", "tool_calls"]
    """``stop``: end of sequence or a stop string; ``length``: max_tokens or the context ran out;
    ``tool_calls``: the model called tools (see ``tool_calls``)."""
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
    tool_calls: list[ToolCall] | None = None
    """The tools the model called, OpenAI's shape (arguments: a JSON object as a string);
    ``text`` then holds only the text beside the calls."""
    parsed: Any = None
    """For a JSON request (return_json, response_format): the JSON value of the text; None if
    it did not parse (e.g. cut off by max_tokens)."""
    logprobs: list[TokenLogprob] | None = None
    """For a request with ``logprobs``: each generated token, its log-probability and the most
    likely alternatives."""


class ItemResult(_Frozen):
    """The outcome of one item of a many-request: a completion or an error."""

    ok: Completion | None = None
    """The completion, if the item succeeded."""
    error: ItemError | None = None
    """The error, if it failed."""

    def outcome(self) -> Completion | FleetError:
        """The completion, or the fleet error the item failed with (its class by name)."""
        if self.ok is not None:
            return self.ok
        error = self.error or ItemError(type="FleetError", message="the request failed")
        cls = getattr(errors, error.type, None)
        if not (isinstance(cls, type) and issubclass(cls, FleetError)):
            cls = FleetError
        return cls(error.message)


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse(schema: type[RequestT], data: dict[str, Any]) -> RequestT:
    """Validate ``data`` against ``schema``; raise InvalidRequest naming every bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(describe(schema, e)) from None


def to_wire(request: BaseModel) -> dict[str, Any]:
    """The JSON-ready kwargs of a task: only the fields the caller set."""
    return request.model_dump(mode="json", exclude_unset=True)
