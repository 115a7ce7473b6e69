"""Reading tool calls and JSON out of fixed model outputs (no engine, no Redis).

The native parser is vLLM's own ``hermes`` parser, the one configured for the tiny model, run
with the tiny model's tokenizer; the fallback forms and the forced-call readers are ours.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from producer.schema import ChatRequest
from producer.settings import ModelConfig, tiny_model_config
from tests.required import require_module
from workers import replies
from workers.engines.base import EngineOutput
from workers.toolcalls import Call, ToolCallReader, fallback

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Weather forecast for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"],
        "additionalProperties": False,
    },
}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters
TOOLS = [WEATHER, CLOCK]
OSLO = {"city": "Oslo", "days": 2}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_path: Path) -> Any:
    require_module("vllm")
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_path))


@pytest.fixture(scope="module")
def hermes(tiny_tokenizer: Any) -> ToolCallReader:
    assert tiny_model_config(Path("unused")).tool_call_parser == "hermes"
    return ToolCallReader("hermes", tiny_tokenizer)


def test_tool_call_tags_are_single_tokens_of_the_tiny_model(tiny_tokenizer: Any) -> None:
    for tag in ("<tool_call>", "</tool_call>"):
        assert len(tiny_tokenizer.encode(tag, add_special_tokens=False)) == 1
    ids = tiny_tokenizer.encode('<tool_call>{"a": 1}</tool_call>', add_special_tokens=False)
    # decoded with vLLM's default skip_special_tokens=True, the tags stay for the parser
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == '<tool_call>{"a": 1}</tool_call>'


def test_an_older_tiny_model_is_rebuilt(tmp_path: Path) -> None:
    from workers.tiny_model import MARKER, VERSION, ensure_tiny_model

    path = ensure_tiny_model(tmp_path / "tiny")
    (path / MARKER).write_text(json.dumps({"seed": 0}))  # as the builder before tools left it
    (path / "tokenizer.json").write_text("{}")
    ensure_tiny_model(path)
    assert json.loads((path / MARKER).read_text())["version"] == VERSION
    assert "<tool_call>" in (path / "tokenizer.json").read_text()
    assert not list(tmp_path.glob(".tiny-*"))  # nothing left beside it


# --- the native parser (vLLM's hermes) -----------------------------------------------------------

def test_hermes_reads_calls_and_keeps_the_text_before_them(hermes: ToolCallReader) -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
            '</tool_call>')
    calls, content = hermes.read(text, TOOLS)
    assert calls == [Call("get_weather", OSLO), Call("get_time", {})]
    assert content == "Let me look."


def test_hermes_drops_calls_of_tools_not_offered(hermes: ToolCallReader) -> None:
    text = '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
    assert hermes.read(text, TOOLS) == ([], text)


def test_hermes_leaves_plain_text_and_broken_calls_alone(hermes: ToolCallReader) -> None:
    assert hermes.read("no call here", TOOLS) == ([], "no call here")
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert hermes.read(broken, TOOLS) == ([], broken)


def test_native_miss_falls_back(hermes: ToolCallReader) -> None:
    text = 'Calling: {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
    assert hermes.read(text, TOOLS) == ([Call("get_weather", OSLO)], "Calling:")


def test_special_tokens_stay_in_the_text_when_the_parser_asks(
    hermes: ToolCallReader, tiny_path: Path
) -> None:
    # vLLM's hermes adjust_request keeps special tokens (some models' tool tags are special)
    assert hermes.keeps_special_tokens(TOOLS, "auto") is True
    assert hermes.keeps_special_tokens(TOOLS, "none") is False
    assert ToolCallReader(None).keeps_special_tokens(TOOLS, "auto") is False
    config = tiny_model_config(tiny_path)
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                       "model": "tiny", "tools": TOOLS})
    assert replies.engine_request(chat, "r", {}, config)[0].sampling == {
        "skip_special_tokens": False}
    mine, _ = replies.engine_request(chat, "r", {"skip_special_tokens": True}, config)
    assert mine.sampling == {"skip_special_tokens": True}  # the caller's choice wins


# --- fallback forms, each with fixed outputs ------------------------------------------------------

def test_fallback_tool_output_tag() -> None:
    text = ('I will check.\n<TOOL_OUTPUT>{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"days": 2}}</TOOL_OUTPUT>')
    assert fallback(text, TOOLS) == ([Call("get_weather", OSLO)], "I will check.")
    several = '<TOOL_OUTPUT>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", ' \
              '"arguments": {"city": "Oslo", "days": 2}}]</TOOL_OUTPUT>'
    assert fallback(several, TOOLS)[0] == [Call("get_time", {}), Call("get_weather", OSLO)]


def test_fallback_json_code_block() -> None:
    text = ('Here is the call:\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"days": 2}}\n```\nDone.')
    assert fallback(text, TOOLS) == ([Call("get_weather", OSLO)], "Here is the call:\n\nDone.")
    bare = '```\n{"name": "get_time", "arguments": {}}\n```'
    assert fallback(bare, TOOLS) == ([Call("get_time", {})], "")


def test_fallback_inline_object() -> None:
    text = 'Sure {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}} there.'
    assert fallback(text, TOOLS) == ([Call("get_weather", OSLO)], "Sure  there.")
    # arguments as a JSON string, and Llama's "parameters" spelling
    as_string = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"days\\": 2}"}'
    assert fallback(as_string, TOOLS)[0] == [Call("get_weather", OSLO)]
    assert fallback('{"name": "get_time", "parameters": {}}', TOOLS)[0] == [Call("get_time", {})]


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"days": 2}}',  # city is required
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 9}}',  # maximum 7
    '{"name": "get_weather", "arguments": {"city": "Oslo", "wind": true}}',  # no extra keys
    '{"name": "get_weather", "arguments": [1, 2]}',  # not an object
    '{"name": "send_mail", "arguments": {}}',  # not offered
    '<TOOL_OUTPUT>{"name": "get_weather", "arguments": {"city": 5}}</TOOL_OUTPUT>',
    '```json\n{"name": "get_weather"}\n```',  # no arguments
    '{"city": "Oslo"}',  # not a call
    '{"name": "get_weather", "arguments": {"city": "Oslo"',  # cut off
])
def test_fallback_refuses_calls_not_offered_or_not_matching_the_schema(text: str) -> None:
    assert fallback(text, TOOLS) == ([], text)


def test_fallback_forms_are_tried_in_order() -> None:
    text = ('{"name": "get_time", "arguments": {}} <TOOL_OUTPUT>{"name": "get_weather", '
            '"arguments": {"city": "Oslo", "days": 2}}</TOOL_OUTPUT>')
    assert fallback(text, TOOLS)[0] == [Call("get_weather", OSLO)]  # the tag wins
    # an invalid tag does not hide a valid inline call
    text = '<TOOL_OUTPUT>not json</TOOL_OUTPUT> {"name": "get_time", "arguments": {}}'
    assert fallback(text, TOOLS) == ([Call("get_time", {})], "<TOOL_OUTPUT>not json</TOOL_OUTPUT>")


def test_reader_without_native_parser_uses_the_fallback_only() -> None:
    reader = ToolCallReader(None)
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert reader.read(text, TOOLS) == ([Call("get_time", {})], "<tool_call></tool_call>")


# --- forced calls and JSON: the schemas and reading the output ------------------------------------

def _reply(**request: Any) -> replies.Reply:
    parsed = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                         "model": "m", **request})
    reply = replies.plan(parsed)
    assert reply is not None
    return reply


@pytest.mark.parametrize("parallel", [None, False])
def test_required_schema_is_the_one_vllm_builds(parallel: bool | None) -> None:
    require_module("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    with_defs = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"when": {"$ref": "#/$defs/day"}},
        "$defs": {"day": {"enum": ["mon", "tue"]}}}}}
    tools = [WEATHER, CLOCK, with_defs]
    ours = _reply(tools=tools, tool_choice="required", parallel_tool_calls=parallel)
    vllm_tools = [ChatCompletionToolsParam.model_validate(copy.deepcopy(t)) for t in tools]
    theirs = get_json_schema_from_tools("required", vllm_tools, parallel)
    assert ours.constraint() == {"json": theirs}
    named = _reply(tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.constraint() == {"json": {"type": "object", "properties": {}}}


def test_forced_outputs_are_read_like_vllm_reads_them() -> None:
    config = ModelConfig(model="unused")
    required = _reply(tools=TOOLS, tool_choice="required")
    text = '[{"name":"get_weather","parameters":{"city":"Oslo","days":2}},' \
           '{"name":"get_time","parameters":{}}]'
    assert replies.read_calls(required, text, config) == (
        [Call("get_weather", OSLO), Call("get_time", {})], "")
    assert replies.read_calls(required, '[{"name":"get_weather","param', config) == ([], "")
    named = _reply(tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert replies.read_calls(named, '{"city":"Oslo","days":2}', config) == (
        [Call("get_weather", OSLO)], "")
    none = _reply(tools=TOOLS, tool_choice="none")
    text = '{"name": "get_time", "arguments": {}}'
    assert replies.read_calls(none, text, config) == ([], text)


def test_finish_shapes_the_result_like_openai() -> None:
    config = ModelConfig(model="unused")
    reply = _reply(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    text = '[{"name":"get_weather","parameters":{"city":"Oslo","days":2}}]'
    out = replies.finish({"text": text, "finish_reason": "stop"},
                         EngineOutput(text, "stop", 1, 2), "task-1", reply, config)
    call = out["tool_calls"][0]
    assert out["finish_reason"] == "tool_calls" and out["text"] == ""
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == OSLO
    # Ids derive from the request id and the call's index: "call_" and the first 24 hex digits
    # of sha256("<request id>:<index>") (here worked out with sha256sum), so a redelivered task
    # answers with the same ids.
    assert [c["id"] for c in out["tool_calls"]] == ["call_d6cecf4e90aa8c2006f6d9ff"]
    both = _reply(tools=TOOLS, tool_choice="required")
    two = '[{"name":"get_weather","parameters":{"city":"Oslo","days":2}},' \
          '{"name":"get_time","parameters":{}}]'
    for request_id, ids in [
        ("task-1", ["call_d6cecf4e90aa8c2006f6d9ff", "call_882df700bdede6510d04f642"]),
        ("task-2", ["call_8da3809dfeddb0c896db8f96", "call_e066af3023ecdd4b7754c05a"]),
    ]:
        out = replies.finish({"text": two, "finish_reason": "stop"},
                             EngineOutput(two, "stop", 1, 2), request_id, both, config)
        assert [c["id"] for c in out["tool_calls"]] == ids

    as_json = replies.plan(ChatRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "model": "m", "return_json": True}))
    out = replies.finish({"text": '{"a": [1]}'}, EngineOutput('{"a": [1]}', "stop", 1, 2),
                         "task-2", as_json, config)
    assert out["parsed"] == {"a": [1]}
    cut = replies.finish({"text": '{"a": ['}, EngineOutput('{"a": [', "length", 1, 2),
                         "task-2", as_json, config)
    assert cut["parsed"] is None


def test_fallback_refuses_a_call_whose_schema_cannot_be_resolved() -> None:
    remote = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "https://example.invalid/a.json"}}}}}
    text = '{"name": "f", "arguments": {"a": 1}}'
    assert fallback(text, [remote]) == ([], text)  # nothing is fetched, nothing trusted
