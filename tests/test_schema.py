"""The wire schema refuses bad input before anything is enqueued, naming the field."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest

from producer import InvalidRequest, chat, generate, generate_many
from producer.client import chat_batch, generate_batch
from producer.schema import GenerateRequest, Sampling, to_wire
from tests.field_errors import assert_names_field
from tests.harness import drop_queue, queued, step_lists
from tests.redis_traffic import nothing_sent, published

BAD_PARAMS = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 64.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"seed": -1}, "seed"),
    ({"seed": "1"}, "seed"),
    ({"unknown_knob": 1}, "unknown_knob"),
    ({"model": "no spaces allowed"}, "model"),
]


@pytest.mark.parametrize(("params", "field"), BAD_PARAMS)
def test_generate_refuses_bad_parameter_naming_it(
    params: dict[str, Any], field: str, app: Any
) -> None:
    kwargs = {"model": "nobody", **params}
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        generate.delay("hello", **kwargs)
    assert_names_field(info.value, field)


def float_fields() -> list[str]:
    """The sampling knobs that take a number (int or float) according to the schema."""
    found = []
    for name, prop in Sampling.model_json_schema()["properties"].items():
        if any(branch.get("type") == "number" for branch in prop.get("anyOf", [prop])):
            found.append(name)
    return sorted(found)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_knobs_refuse_nan_and_infinity(value: float, app: Any) -> None:
    fields = float_fields()
    assert {"temperature", "top_p", "min_p", "repetition_penalty"} <= set(fields)
    for field in fields:
        with nothing_sent(), pytest.raises(InvalidRequest, match="finite number") as info:
            generate.delay("hello", model="nobody", **{field: value})
        assert_names_field(info.value, field)
        assert "than" not in str(info.value)  # not "less than or equal to 100"
    with nothing_sent(), pytest.raises(InvalidRequest, match="finite number") as bias:
        generate.delay("hello", model="nobody", logit_bias={"17": value})
    assert_names_field(bias.value, "logit_bias.17")


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(17)], 5, [""], "", ["x" * 1001]])
def test_bad_stop_says_once_what_is_allowed(stop: Any, app: Any) -> None:
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        generate.delay("hello", model="nobody", stop=stop)
    message = str(info.value)
    assert_names_field(message, "stop")
    assert message.startswith("invalid GenerateRequest: stop: a string or a list of at most 16 "
                              "strings"), message
    assert "; " not in message  # one error, not one per member of the union type


@pytest.mark.parametrize("choice", ["sometimes", 5, {"type": "function", "function": {}}])
def test_bad_tool_choice_says_once_what_is_allowed(choice: Any, app: Any) -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        chat.delay(USER, model="nobody", tools=[tool], tool_choice=choice)
    message = str(info.value)
    assert_names_field(message, "tool_choice")
    assert "'auto', 'none', 'required' or " in message, message
    assert "; " not in message


HINTS = [
    ({"max_new_tokens": 5}, "use max_tokens"),
    ({"max_length": 5}, "use max_tokens, which counts generated tokens only"),
    ({"do_sample": True}, "use temperature, 0 decodes greedily"),
    ({"num_beams": 4}, "beam search is not supported"),
    ({"n": 2}, "one completion per request: send it n times, with different seeds"),
    ({"stop_sequences": ["x"]}, "use stop"),
    ({"repeat_penalty": 1.1}, "use repetition_penalty"),
    ({"temprature": 0.5}, "did you mean temperature?"),
    ({"top-p": 0.5}, "did you mean top_p?"),
]


@pytest.mark.parametrize(("params", "hint"), HINTS)
def test_unknown_field_hints_at_the_field_meant(
    params: dict[str, Any], hint: str, app: Any
) -> None:
    (field,) = params
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        generate.delay("hello", model="nobody", **params)
    assert_names_field(info.value, field)
    assert f"{field}: unknown field, {hint} (got " in str(info.value)


def test_unknown_field_hints_below_the_request(app: Any) -> None:
    from producer import generate_many

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strcit": True}}
    with nothing_sent():
        with pytest.raises(InvalidRequest) as message:
            chat.delay([{"role": "user", "contnet": "hi"}], model="nobody")
        with pytest.raises(InvalidRequest) as nested:
            generate.delay("hello", model="nobody", response_format=fmt)
        with pytest.raises(InvalidRequest) as item:
            generate_many.delay([{"prompt": "ok"}, {"prompt": "x", "max_new_tokens": 5}],
                                model="nobody")
        with pytest.raises(InvalidRequest) as no_hint:
            generate.delay("hello", model="nobody", unknown_knob=1)
    assert "messages.0.contnet: unknown field, did you mean content?" in str(message.value)
    assert "json_schema.strcit: unknown field, did you mean strict?" in str(nested.value)
    assert_names_field(item.value, "requests.1.max_new_tokens")
    assert "max_new_tokens: unknown field, use max_tokens" in str(item.value)
    assert str(no_hint.value).endswith("unknown_knob: unknown field (got 1)")


def test_validator_and_dict_key_errors_read_plainly(app: Any) -> None:
    with nothing_sent():
        with pytest.raises(InvalidRequest) as key:
            generate.delay("hello", model="nobody", logit_bias={"the": 1.0})
        with pytest.raises(InvalidRequest) as rule:
            generate.delay("hello", model="nobody", min_tokens=9, max_tokens=4)
    assert "logit_bias.the: String should match pattern" in str(key.value)  # not .the.[key]
    assert "min_tokens: min_tokens (9) is above max_tokens (4) (got 9)" in str(rule.value)


def test_generate_refuses_missing_or_wrong_prompt(app: Any) -> None:
    with nothing_sent():
        with pytest.raises(InvalidRequest) as empty:
            generate.delay("", model="nobody")
        with pytest.raises(InvalidRequest) as a_list:
            generate.delay(["a list"], model="nobody")
        with pytest.raises(InvalidRequest) as no_model:
            generate.delay("hello")
        with pytest.raises(InvalidRequest, match="positional"):
            generate.delay("hello", "tiny")
        with pytest.raises(InvalidRequest) as twice:
            generate.delay("hello", prompt="hello", model="nobody")
    assert_names_field(empty.value, "prompt")
    assert_names_field(a_list.value, "prompt")
    assert_names_field(no_model.value, "model")
    assert_names_field(twice.value, "prompt")


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages.0.role"),
        ([{"role": "user"}], "messages.0.content"),
        ([{"role": "user", "content": "hi", "name": "x"}], "messages.0.name"),
        ("hi", "messages"),
    ],
)
def test_chat_refuses_bad_messages_naming_the_field(messages: Any, field: str, app: Any) -> None:
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        chat.delay(messages, model="nobody")
    assert_names_field(info.value, field)


def test_batch_helper_enqueues_nothing_if_one_item_is_invalid(app: Any) -> None:
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        generate_batch(["fine", "also fine", ""], model="nobody", timeout=1)
    assert_names_field(info.value, "prompts.2.prompt")


def test_batch_helpers_name_the_bad_item(app: Any) -> None:
    prompts: list[Any] = ["fine"] * 10_000
    prompts[7_321] = {"prompt": "fine", "temperature": -1}
    with nothing_sent():
        with pytest.raises(InvalidRequest) as prompt:
            generate_batch(prompts, model="nobody", timeout=1)
        with pytest.raises(InvalidRequest) as role:
            chat_batch([USER, [{"role": "robot", "content": "hi"}]], model="nobody", timeout=1)
        with pytest.raises(InvalidRequest) as not_a_list:
            chat_batch([USER, USER, 5], model="nobody", timeout=1)  # type: ignore[list-item]
    assert_names_field(prompt.value, "prompts.7321.temperature")
    assert_names_field(role.value, "conversations.1.messages.0.role")
    assert_names_field(not_a_list.value, "conversations.2.messages")


def test_wire_carries_only_fields_the_caller_set() -> None:
    request = GenerateRequest.model_validate({"prompt": "hi", "model": "tiny", "seed": 3})
    assert to_wire(request) == {"prompt": "hi", "model": "tiny", "seed": 3}


def test_valid_call_lands_on_the_model_queue(app: Any, redis_client: Any) -> None:
    with published() as keys:
        result = generate.delay("hello", model="parked", max_tokens=3, temperature=0.5)
    assert keys == ["fleet.model.parked"]  # what the refused calls' checks would have seen
    assert len(queued(redis_client, "fleet.model.parked")) == 1
    result.forget()
    drop_queue(redis_client, "fleet.model.parked")


def test_many_task_names_the_bad_item_and_field(app: Any) -> None:
    from producer import generate_many

    with nothing_sent():
        with pytest.raises(InvalidRequest) as item:
            generate_many.delay([{"prompt": "ok"}, {"prompt": "x", "temperature": -1}],
                                model="nobody")
        with pytest.raises(InvalidRequest) as empty:
            generate_many.delay([], model="nobody")
    assert_names_field(item.value, "requests.1.temperature")
    assert_names_field(empty.value, "requests")


# --- tools, tool calls, JSON output, vLLM extras ---

TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}
USER = [{"role": "user", "content": "weather?"}]


def _tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


BAD_CHAT_PARAMS = [
    ({"tools": [_tool(parameters={"type": "objekt"})]}, "tools.0.function.parameters"),
    ({"tools": [_tool(parameters={"properties": {"a": {"minLength": -1}}})]},
     "tools.0.function.parameters"),
    ({"tools": [_tool(parameters={"type": "array"})]}, "tools.0.function.parameters"),
    ({"tools": [_tool(parameters="not a schema")]}, "tools.0.function.parameters"),
    ({"tools": [_tool(name="has space")]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [_tool(), _tool()]}, "tools"),
    ({"tools": []}, "tools"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "return_json": True}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": "city"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "text"}, "return_json": True}, "return_json"),
    ({"return_json": "yes"}, "return_json"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {"the": 1.0}}, "logit_bias"),
    ({"logit_bias": {"17": 101.0}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"n": 2}, "n"),  # not on the allow-list
    ({"guided_json": {}}, "guided_json"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize(("params", "field"), BAD_CHAT_PARAMS)
def test_chat_refuses_bad_tools_schemas_and_extras_naming_the_field(
    params: dict[str, Any], field: str, app: Any
) -> None:
    params = {"messages": USER, **params}
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        chat.delay(model="nobody", **params)
    assert_names_field(info.value, field)


def test_generate_refuses_a_bad_json_schema(app: Any) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
    with nothing_sent(), pytest.raises(InvalidRequest, match="Draft 2020-12") as info:
        generate.delay("hi", model="nobody", response_format=bad)
    assert_names_field(info.value, "response_format.json_schema.schema")


def test_tool_conversation_and_json_format_travel_as_given() -> None:
    from producer.schema import ChatRequest

    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    request = ChatRequest.model_validate({
        "messages": messages, "model": "tiny", "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "logprobs": 2, "logit_bias": {"17": -100.0},
    })
    wire = to_wire(request)
    assert wire["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert ChatRequest.model_validate(wire) == request  # the worker reads what was sent
    as_json = ChatRequest.model_validate({"messages": USER, "model": "m", "response_format": fmt})
    assert to_wire(as_json)["response_format"] == fmt  # "schema", OpenAI's key, on the wire
    # OpenAI lets an assistant tool-call message leave out "content"
    ChatRequest.model_validate({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]})


def test_priority_levels_and_numbers(app: Any) -> None:
    from producer.schema import PRIORITY_LEVELS, ManyRequest

    for value, number in [("interactive", 0), ("default", 5), ("batch", 9), (0, 0), (7, 7)]:
        assert GenerateRequest.model_validate(
            {"prompt": "x", "model": "tiny", "priority": value}).priority == number
    for bad in ("urgent", 10, -1, 2.5, True):
        with pytest.raises(InvalidRequest) as refused:
            generate.delay("x", model="tiny", priority=bad)
        assert_names_field(refused.value, "priority")
    with pytest.raises(InvalidRequest) as both:
        generate.apply_async(kwargs={"prompt": "x", "model": "tiny", "priority": 0},
                             priority=9)
    assert_names_field(both.value, "priority")
    with pytest.raises(InvalidRequest) as item:
        generate_many.delay([{"prompt": "a"}, {"prompt": "b", "priority": 0}], model="tiny")
    assert_names_field(item.value, "requests.1.priority")
    with pytest.raises(InvalidRequest) as batch_item:
        generate_batch(["a", {"prompt": "b", "priority": 0}], model="tiny")
    assert_names_field(batch_item.value, "prompts.1.priority")
    assert PRIORITY_LEVELS == {"interactive": 0, "default": 5, "batch": 9}
    assert ManyRequest.model_fields["priority"].default is None


def test_a_task_goes_to_its_priority_step_with_its_priority_on_the_wire(
        app: Any, redis_client: Any) -> None:
    """kombu's step lists (0, 3, 6, 9): default (5) waits at step 3, batch at 9; the message
    body carries the priority the worker hands its engine, and the queue's wake list an entry."""
    queue = "fleet.model.parked-priority"
    handles = [generate.delay("a", model="parked-priority"),
               generate.delay("b", model="parked-priority", priority="interactive"),
               generate.apply_async(kwargs={"prompt": "c", "model": "parked-priority"},
                                    priority=7),
               generate_many.delay([{"prompt": "d"}], model="parked-priority")]
    try:
        steps = {step: [json.loads(m) for m in redis_client.lrange(key, 0, -1)]
                 for step, key in zip((0, 3, 6, 9), step_lists(queue), strict=True)}
        ids = {step: [m["headers"]["id"] for m in ms] for step, ms in steps.items()}
        assert ids == {0: [handles[1].id], 3: [handles[0].id], 6: [handles[2].id],
                       9: [handles[3].id]}
        wire = {m["headers"]["id"]: json.loads(base64.b64decode(m["body"]))[1]["priority"]
                for ms in steps.values() for m in ms}
        assert [wire[h.id] for h in handles] == [5, 0, 7, 9]
        assert redis_client.exists(f"fleet.wake.{queue}")
    finally:
        for handle in handles:
            handle.forget()
        drop_queue(redis_client, queue)
