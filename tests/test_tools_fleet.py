"""Tools, JSON output and vLLM extras end to end: `.delay()`, real Redis, the session's real
`fleet worker` a1 (model `tiny`, the real vLLM CPU engine; no extra engine starts).

The tiny model's weights are random, so its free text never holds a tool call; what these tests
show is that structured-output decoding makes even it return calls and JSON that satisfy the
schemas, through its own chat template and vLLM's parser configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from producer import chat, generate
from producer.client import chat_batch
from tests.harness import WorkerProc

pytestmark = pytest.mark.engine

TIMEOUT = 120
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Forecast for a city", "parameters": WEATHER_ARGS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": CLOCK["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(result: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    assert result["finish_reason"] == "tool_calls" and result["text"] == ""
    calls = result["tool_calls"]
    assert calls and len({c["id"] for c in calls}) == len(calls)
    for call in calls:
        assert call["type"] == "function" and call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])  # a JSON string that parses
        Draft202012Validator(SCHEMAS[call["function"]["name"]]).validate(arguments)
    return calls


def test_required_tool_call_has_schema_valid_arguments(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    result = chat.delay(ASK, model="tiny", tools=[WEATHER, CLOCK], tool_choice="required",
                        temperature=0.0, max_tokens=120).get(timeout=TIMEOUT)
    _check_calls(result, {"get_weather", "get_time"})
    # sampled, several seeds, one call at most: still valid every time
    for seed in range(3):
        one = chat.delay(ASK, model="tiny", tools=[WEATHER, CLOCK], tool_choice="required",
                         parallel_tool_calls=False, temperature=1.0, seed=seed,
                         max_tokens=120).get(timeout=TIMEOUT)
        assert len(_check_calls(one, {"get_weather", "get_time"})) == 1


def test_named_tool_is_the_one_called(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    for name in ("get_weather", "get_time"):
        choice = {"type": "function", "function": {"name": name}}
        result = chat.delay(ASK, model="tiny", tools=[WEATHER, CLOCK], tool_choice=choice,
                            temperature=0.0, max_tokens=60).get(timeout=TIMEOUT)
        assert [c["function"]["name"] for c in _check_calls(result, {name})] == [name]


def test_multi_turn_with_tool_results_through_the_models_template(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any, tiny_dir: Path
) -> None:
    from transformers import AutoTokenizer

    first = chat.delay(ASK, model="tiny", tools=[WEATHER], tool_choice="required",
                       temperature=0.0, max_tokens=120).get(timeout=TIMEOUT)
    call = first["tool_calls"][0]
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"},
    ]
    results = chat_batch([conversation] * 2, model="tiny", tools=[WEATHER], max_tokens=8,
                         temperature=0.0, timeout=TIMEOUT)
    assert results[0].text == results[1].text and results[0].finish_reason in ("stop", "length")
    # The prompt the engine saw is the tiny model's own template with tools and tool messages.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    arguments = json.loads(call["function"]["arguments"])
    rendered = tokenizer.apply_chat_template(
        [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {**call, "function": {"name": call["function"]["name"], "arguments": arguments}}]},
         conversation[2]],
        tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in rendered
    assert results[0].prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_json_object_mode_constrains_the_output(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any, tiny_dir: Path
) -> None:
    from transformers import AutoTokenizer

    # Random weights never close an open-ended object on their own; pushing "}" up with the
    # logit_bias extra shows the constraint: free text is "}}}}", JSON mode must open first.
    close = AutoTokenizer.from_pretrained(str(tiny_dir)).convert_tokens_to_ids("}")
    bias = {str(close): 100.0}
    free = chat.delay(ASK, model="tiny", logit_bias=bias, max_tokens=4,
                      temperature=0.0).get(timeout=TIMEOUT)
    assert free["text"] == "}}}}" and "parsed" not in free
    for kwargs in ({"return_json": True}, {"response_format": {"type": "json_object"}}):
        result = chat.delay(ASK, model="tiny", logit_bias=bias, max_tokens=16, temperature=0.0,
                            **kwargs).get(timeout=TIMEOUT)
        assert result["finish_reason"] == "stop"
        assert result["parsed"] == json.loads(result["text"]) == {}
    cut = generate.delay("x", model="tiny", return_json=True, max_tokens=3,
                         temperature=0.0).get(timeout=TIMEOUT)
    assert cut["finish_reason"] == "length" and cut["parsed"] is None  # cut off: no object


def test_json_schema_mode_returns_the_parsed_object(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    schema = {"type": "object", "properties": {
        "verdict": {"enum": ["pass", "fail"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    }, "required": ["verdict", "score"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "grade", "schema": schema}}
    results = [chat.delay(ASK, model="tiny", response_format=fmt, temperature=t, seed=3,
                          max_tokens=60) for t in (0.0, 1.0)]
    results.append(generate.delay("Grade this:", model="tiny", response_format=fmt,
                                  max_tokens=60))
    for handle in results:
        result = handle.get(timeout=TIMEOUT)
        assert result["finish_reason"] == "stop"
        Draft202012Validator(schema).validate(result["parsed"])
        assert json.loads(result["text"]) == result["parsed"]


def test_vllm_extras_reach_the_engine(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    result = generate.delay("Hello", model="tiny", max_tokens=4, logprobs=2,
                            temperature=0.0).get(timeout=TIMEOUT)
    tokens = result["logprobs"]
    assert len(tokens) == result["completion_tokens"] > 0
    for token in tokens:
        assert token["logprob"] <= 0.0 and 2 <= len(token["top_logprobs"]) <= 3
        assert token["token_id"] in {t["token_id"] for t in token["top_logprobs"]}  # greedy
    assert "".join(t["token"] for t in tokens) == result["text"]
    banned = generate.delay("Hello", model="tiny", max_tokens=4, temperature=0.0,
                            logit_bias={str(tokens[0]["token_id"]): -100.0}).get(timeout=TIMEOUT)
    assert banned["text"] != result["text"]


def test_ignore_eos_and_min_tokens_change_where_generation_ends(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any, tiny_dir: Path
) -> None:
    from transformers import AutoTokenizer

    # Pushing the end token up makes the model stop at once, unless an extra says otherwise.
    eos = AutoTokenizer.from_pretrained(str(tiny_dir)).eos_token_id
    ask = {"model": "tiny", "max_tokens": 8, "temperature": 0.0, "logit_bias": {str(eos): 100.0}}
    stops = generate.delay("Hello", **ask).get(timeout=TIMEOUT)
    assert stops["finish_reason"] == "stop" and stops["text"] == ""
    eos_counted = stops["completion_tokens"]  # the end token itself (vLLM counts it)
    assert eos_counted <= 1
    ignored = generate.delay("Hello", ignore_eos=True, **ask).get(timeout=TIMEOUT)
    assert ignored["finish_reason"] == "length" and ignored["completion_tokens"] == 8
    at_least = generate.delay("Hello", min_tokens=3, **ask).get(timeout=TIMEOUT)
    assert at_least["finish_reason"] == "stop"
    assert at_least["completion_tokens"] == 3 + eos_counted
