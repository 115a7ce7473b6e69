"""What a request asks of its output beyond text (tool calls, JSON), and reading it back.

Before the engine: :func:`engine_request` turns a validated request into what the engine sees,
with the structured-output constraint a forced tool call or a JSON request needs and the tools
its chat template shows. After: :func:`finish` reads the finished text on the task's own thread
(tool calls, the parsed JSON), so the engine thread only generates.

Forced calls follow vLLM's OpenAI server (``vllm/tool_parsers/utils.py``
``get_json_schema_from_tools``; ``vllm/parser/abstract_parser.py`` reads the output): a named
function is generated as its arguments object, ``required`` as a JSON list of
``{"name": ..., "parameters": ...}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from producer.schema import ChatRequest, GenerateRequest, NamedToolChoice
from producer.settings import ModelConfig
from workers.engines.base import EngineOutput, EngineRequest
from workers.toolcalls import Call, reader_for

EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Reply:
    """How to constrain and read one request's output."""

    tools: tuple[dict[str, Any], ...] = ()
    """Tools offered (OpenAI's shape, JSON-ready)."""
    tool_choice: str = "none"
    """``auto``, ``none``, ``required`` or ``function`` (a named function is forced)."""
    function: str | None = None
    """The forced function of a named tool_choice."""
    parallel: bool = True
    """More than one call allowed."""
    json_format: dict[str, Any] | None = None
    """The constraint of a JSON request: ``{"json_object": True}`` or ``{"json": schema}``."""

    def constraint(self) -> dict[str, Any] | None:
        """The engine's structured-output constraint (fields of vLLM StructuredOutputsParams)."""
        if self.tool_choice == "function":
            return {"json": self.parameters(self.function or "")}
        if self.tool_choice == "required":
            return {"json": required_schema(self.tools, parallel=self.parallel)}
        return self.json_format

    def parameters(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or EMPTY_OBJECT
        raise KeyError(name)


def plan(request: GenerateRequest | ChatRequest) -> Reply | None:
    """The reply a request asks for; None for plain text."""
    fmt = request.json_format()
    json_format = None
    if fmt is not None:
        json_format = ({"json": fmt.json_schema.schema_} if fmt.json_schema is not None
                       else {"json_object": True})
    if not isinstance(request, ChatRequest) or not request.tools:
        return Reply(json_format=json_format) if json_format else None
    choice = request.tool_choice or "auto"  # OpenAI's default when tools are offered
    forced = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return Reply(
        tools=tuple(tool.model_dump(mode="json", exclude_none=True) for tool in request.tools),
        tool_choice="function" if forced else str(choice),
        function=forced,
        parallel=request.parallel_tool_calls is not False,
        json_format=json_format,
    )


def engine_request(request: GenerateRequest | ChatRequest, request_id: str,
                   sampling: dict[str, Any], config: ModelConfig
                   ) -> tuple[EngineRequest, Reply | None]:
    """What the engine sees of a validated request (``sampling``: knobs with defaults applied),
    and the reply to read its output into (None: plain text)."""
    reply = plan(request)
    constraint = reply.constraint() if reply is not None else None
    if constraint is not None:
        sampling = {**sampling, "structured_outputs": constraint}
    if (reply is not None and reply.tool_choice == "auto" and "skip_special_tokens" not in sampling
            and reader_for(config).keeps_special_tokens(reply.tools, "auto")):
        sampling = {**sampling, "skip_special_tokens": False}  # as vLLM's server does
    # Only a server applies these itself; the engine in the worker has the constraint.
    fields = api_fields(request, reply, constraint) if config.engine == "openai" else None
    if isinstance(request, ChatRequest):
        messages = [m.model_dump() for m in request.messages]
        tools = list(reply.tools) if reply is not None and reply.tools else None
        return EngineRequest(request_id, sampling, messages=messages, tools=tools,
                             api_fields=fields), reply
    return EngineRequest(request_id, sampling, prompt=request.prompt, api_fields=fields), reply


def api_fields(request: GenerateRequest | ChatRequest, reply: Reply | None,
               constraint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The reply's form in OpenAI's fields, for a server that applies it itself (an ``openai``
    engine): ``tool_choice`` auto or none goes as it is (the server's parser reads auto calls);
    a forced call is generated as on the fleet's own engines, JSON constrained to the arguments
    (or to the list of calls) through ``response_format``, and read back by the fleet.
    ``constraint``: the reply's own (``Reply.constraint``)."""
    if reply is None:
        return None
    fields: dict[str, Any] = {}
    forced = reply.tool_choice in ("function", "required")
    if reply.tools:
        fields["tool_choice"] = "none" if forced else reply.tool_choice
        if not reply.parallel and not forced:
            fields["parallel_tool_calls"] = False
    fmt = request.json_format()
    if not forced and fmt is not None:  # the request's own response_format, as it gave it
        fields["response_format"] = fmt.model_dump(mode="json", by_alias=True,
                                                   exclude_none=True)
    elif constraint is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": reply.function or "tool_calls", "schema": constraint["json"]}}
    return fields or None


def required_schema(tools: tuple[dict[str, Any], ...], *, parallel: bool) -> dict[str, Any]:
    """JSON schema of ``tool_choice="required"`` output: a list of calls of offered tools."""
    variants, defs = [], {}
    for tool in tools:
        params = dict(tool["function"].get("parameters") or EMPTY_OBJECT)
        # "#/$defs/..." references resolve against the root, so definitions move up there.
        defs.update(params.pop("$defs", {}))
        variants.append({
            "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                           "parameters": params or EMPTY_OBJECT},
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def finish(completion: dict[str, Any], out: EngineOutput, request_id: str,
           reply: Reply | None, config: ModelConfig) -> dict[str, Any]:
    """Add what the request asked for besides text: tool calls, parsed JSON, logprobs."""
    if out.logprobs is not None:
        completion["logprobs"] = out.logprobs
    if reply is None:
        return completion
    if reply.json_format is not None:
        completion["parsed"] = _json_or_none(out.text)
    if out.tool_calls:  # the server's own parser read them (an openai engine)
        offered = {tool["function"]["name"] for tool in reply.tools}
        calls, content = [c for c in out.tool_calls if c.name in offered], out.text
    else:
        calls, content = read_calls(reply, out.text, config)
    if calls:
        if not reply.parallel:
            calls = calls[:1]
        completion["tool_calls"] = [
            call.to_openai(call_id(request_id, i)) for i, call in enumerate(calls)
        ]
        completion["text"] = content
        if out.finish_reason != "abort":
            completion["finish_reason"] = "tool_calls"
    return completion


def read_calls(reply: Reply, text: str, config: ModelConfig) -> tuple[list[Call], str]:
    """The calls in a finished text, and the text left beside them."""
    if reply.tool_choice == "function":
        arguments = _json_or_none(text)
        if isinstance(arguments, dict) and reply.function:
            return [Call(reply.function, arguments)], ""
    elif reply.tool_choice == "required":
        return _required_calls(text, reply), ""
    elif reply.tool_choice == "auto":
        return reader_for(config).read(text, reply.tools)
    return [], text


def _required_calls(text: str, reply: Reply) -> list[Call]:
    value = _json_or_none(text)
    names = {tool["function"]["name"] for tool in reply.tools}
    calls = []
    for item in value if isinstance(value, list) else []:
        if (isinstance(item, dict) and item.get("name") in names
                and isinstance(item.get("parameters"), dict)):
            calls.append(Call(item["name"], item["parameters"]))
    return calls


def call_id(request_id: str, index: int) -> str:
    """Ids derived from the request's id: a redelivered task returns the same ids."""
    digest = hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
