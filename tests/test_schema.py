"""The wire schema refuses bad input before anything is enqueued, naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from producer import InvalidRequest, chat, generate
from producer.client import generate_batch
from producer.schema import GenerateRequest, to_wire

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
    params: dict[str, Any], field: str, app: Any, redis_client: Any
) -> None:
    kwargs = {"model": "nobody", **params}
    with pytest.raises(InvalidRequest) as info:
        generate.delay("hello", **kwargs)
    assert field in str(info.value)
    assert redis_client.llen("fleet.model.nobody") == 0  # nothing was enqueued


def test_generate_refuses_missing_or_wrong_prompt(app: Any, redis_client: Any) -> None:
    with pytest.raises(InvalidRequest, match="prompt"):
        generate.delay("", model="nobody")
    with pytest.raises(InvalidRequest, match="prompt"):
        generate.delay(["a list"], model="nobody")
    with pytest.raises(InvalidRequest, match="model"):
        generate.delay("hello")
    with pytest.raises(InvalidRequest, match="positional"):
        generate.delay("hello", "tiny")
    assert redis_client.llen("fleet.model.nobody") == 0


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
def test_chat_refuses_bad_messages_naming_the_field(
    messages: Any, field: str, app: Any, redis_client: Any
) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat.delay(messages, model="nobody")
    assert field in str(info.value)
    assert redis_client.llen("fleet.model.nobody") == 0


def test_batch_helper_enqueues_nothing_if_one_item_is_invalid(app: Any, redis_client: Any) -> None:
    with pytest.raises(InvalidRequest, match="prompt"):
        generate_batch(["fine", "also fine", ""], model="nobody", timeout=1)
    assert redis_client.llen("fleet.model.nobody") == 0


def test_wire_carries_only_fields_the_caller_set() -> None:
    request = GenerateRequest.model_validate({"prompt": "hi", "model": "tiny", "seed": 3})
    assert to_wire(request) == {"prompt": "hi", "model": "tiny", "seed": 3}


def test_valid_call_lands_on_the_model_queue(app: Any, redis_client: Any) -> None:
    result = generate.delay("hello", model="parked", max_tokens=3, temperature=0.5)
    assert redis_client.llen("fleet.model.parked") == 1
    result.forget()
    redis_client.delete("fleet.model.parked")


def test_many_task_names_the_bad_item_and_field(app: Any, redis_client: Any) -> None:
    from producer import generate_many

    with pytest.raises(InvalidRequest, match=r"requests\.1: .*temperature"):
        generate_many.delay([{"prompt": "ok"}, {"prompt": "x", "temperature": -1}],
                            model="nobody")
    with pytest.raises(InvalidRequest, match="requests"):
        generate_many.delay([], model="nobody")
    assert redis_client.llen("fleet.model.nobody") == 0
