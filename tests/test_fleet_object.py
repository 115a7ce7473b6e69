"""``params=`` (a reusable Sampling) wherever sampling keywords go, and the Fleet object.

The wire checks read the messages from the queue of a model no engine serves; the helpers' and
the Fleet's behaviour runs against a worker on the fake engine (which generates exactly
``max_tokens`` tokens, so a result shows the limit that won) and, end to end, against the real
tiny vLLM engine.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from producer import Fleet, GenerateRequest, InvalidRequest, Sampling, chat, client, generate
from producer.naming import model_queue
from tests.field_errors import assert_names_field
from tests.harness import Fleet as Harness
from tests.harness import WorkerProc, queued
from tests.redis_traffic import nothing_sent

PARKED = "parked-fleetobj"  # no engine serves it: its tasks wait where the tests read them
FAKE = "fleetobj-fake"  # tests/conftest.py: a model on the fake engine
FAKE_ENGINE = "fleetobj1"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def parked(app: Any, redis_client: Any) -> Iterator[Callable[[], dict[str, dict[str, Any]]]]:
    """The kwargs of every message waiting in the parked model's queue, by task id."""
    queue = model_queue(PARKED)

    def sent() -> dict[str, dict[str, Any]]:
        messages = [json.loads(m) for m in queued(redis_client, queue)]
        return {m["headers"]["id"]: json.loads(base64.b64decode(m["body"]))[1]
                for m in messages}

    yield sent
    from tests.harness import drop_queue

    drop_queue(redis_client, queue)


def test_params_travel_as_the_fields_they_set(parked: Any) -> None:
    handles = [
        generate.delay("hi", model=PARKED, params=Sampling(temperature=0.5, max_tokens=3)),
        chat.apply_async(kwargs={"messages": USER, "model": PARKED,
                                 "params": {"seed": 7, "stop": ["x"]}}),
        # A request is a Sampling too: only its sampling fields count.
        generate.delay("hi", model=PARKED,
                       params=GenerateRequest(prompt="other", model="other", top_k=4)),
    ]
    assert parked() == {
        handles[0].id: {"prompt": "hi", "model": PARKED, "temperature": 0.5, "max_tokens": 3,
                        "priority": 5},
        handles[1].id: {"messages": USER, "model": PARKED, "seed": 7, "stop": ["x"],
                        "priority": 5},
        handles[2].id: {"prompt": "hi", "model": PARKED, "top_k": 4, "priority": 5},
    }
    for handle in handles:
        handle.forget()


def test_a_keyword_of_the_call_wins_over_params(parked: Any) -> None:
    base = Sampling(temperature=0.9, seed=1, max_tokens=100)
    handle = generate.delay("hi", model=PARKED, params=base, temperature=0, max_tokens=4)
    assert parked() == {handle.id: {"prompt": "hi", "model": PARKED, "temperature": 0,
                                    "seed": 1, "max_tokens": 4, "priority": 5}}
    handle.forget()


def _every_entry_point(params: Any) -> list[Callable[[], Any]]:
    """Each way of passing ``params``: the tasks, the helpers, the Fleet."""
    return [
        lambda: generate.delay("hi", model=PARKED, params=params),
        lambda: chat.apply_async((USER,), {"model": PARKED, "params": params}),
        lambda: client.generate("hi", model=PARKED, params=params, timeout=1),
        lambda: client.chat(USER, model=PARKED, params=params, timeout=1),
        lambda: client.stream_generate("hi", model=PARKED, params=params),
        lambda: client.stream_chat(USER, model=PARKED, params=params),
        lambda: client.generate_batch(["a", "b"], model=PARKED, params=params, timeout=1),
        lambda: client.chat_batch([USER], model=PARKED, params=params, timeout=1),
        lambda: Fleet(PARKED, params=params),
        lambda: Fleet(PARKED).generate("hi", params=params),
        lambda: Fleet(PARKED).chat_batch([USER], params=params),
    ]


@pytest.mark.parametrize(("params", "field"), [
    ({"temperature": -1}, "params.temperature"),
    (Sampling.model_construct(top_p=5.0), "params.top_p"),  # built unvalidated, checked here
    ({"max_new_tokens": 5}, "params.max_new_tokens"),
    ({"prompt": "smuggled"}, "params.prompt"),  # only sampling fields
])
def test_a_bad_params_field_is_refused_naming_it(params: Any, field: str, app: Any) -> None:
    for call in _every_entry_point(params):
        with nothing_sent(), pytest.raises(InvalidRequest) as info:
            call()
        assert_names_field(info.value, field)


def test_a_refused_params_field_reads_as_its_own_error(app: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        generate.delay("hi", model=PARKED, params={"temperature": -1})
    assert str(info.value) == ("params: invalid Sampling: temperature: Input should be greater "
                               "than or equal to 0 (got -1)")
    with pytest.raises(InvalidRequest, match="params: invalid Sampling: max_new_tokens: "
                                             "unknown field, use max_tokens"):
        generate.delay("hi", model=PARKED, params={"max_new_tokens": 5})


@pytest.mark.parametrize("params", ["temperature=0", 0.5, [("temperature", 0.0)]])
def test_params_of_another_type_are_refused_naming_params(params: Any, app: Any) -> None:
    for call in _every_entry_point(params):
        with nothing_sent(), pytest.raises(InvalidRequest) as info:
            call()
        assert_names_field(info.value, "params")
        assert f"not {type(params).__name__}" in str(info.value)


def test_a_fleet_refuses_a_bad_model_or_priority_when_made(app: Any) -> None:
    with nothing_sent():
        with pytest.raises(InvalidRequest) as model:
            Fleet("no spaces allowed")
        with pytest.raises(InvalidRequest) as priority:
            Fleet(PARKED, priority="urgent")
        with pytest.raises(InvalidRequest) as other:
            Fleet(PARKED).generate("hi", model="another")
    assert_names_field(model.value, "model")
    assert_names_field(priority.value, "priority")
    assert_names_field(other.value, "model")


def test_a_fleet_s_defaults_give_way_to_the_call(parked: Any) -> None:
    llm = Fleet(PARKED, params=Sampling(temperature=0.9, seed=1, max_tokens=9),
                priority="interactive")
    streams = [llm.stream_generate("hi", params={"seed": 2, "max_tokens": 5}, max_tokens=4),
               llm.stream_chat(USER, priority=7)]
    assert parked() == {
        streams[0].task_id: {"prompt": "hi", "model": PARKED, "temperature": 0.9, "seed": 2,
                             "max_tokens": 4, "priority": 0, "stream": True},
        streams[1].task_id: {"messages": USER, "model": PARKED, "temperature": 0.9, "seed": 1,
                             "max_tokens": 9, "priority": 7, "stream": True},
    }
    for stream in streams:
        stream.handle.forget()


@pytest.fixture(scope="module")
def fake_worker(fleet_env: dict[str, str], app: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    """A worker on the fake engine, for the merge rules; the last test shuts it down."""
    harness = Harness(fleet_env, tmp_path_factory.mktemp("fleetobj-logs"))
    try:  # stopped even if it never gets ready
        worker = harness.start(FAKE, FAKE_ENGINE)
        harness.wait_ready(app, worker)
        yield worker
    finally:
        harness.stop_all()


def _tokens(results: list[Any]) -> list[int]:
    return [r.completion_tokens for r in results]


def test_batch_items_win_over_keywords_which_win_over_params(fake_worker: WorkerProc) -> None:
    prompts = ["one", {"prompt": "two", "max_tokens": 2}, "three"]
    assert _tokens(client.generate_batch(prompts, model=FAKE, params=Sampling(max_tokens=7),
                                         timeout=60)) == [7, 2, 7]
    assert _tokens(client.generate_batch(prompts, model=FAKE, params={"max_tokens": 7},
                                         max_tokens=5, timeout=60)) == [5, 2, 5]
    conversations = [USER, {"messages": USER, "max_tokens": 1}]
    assert _tokens(client.chat_batch(conversations, model=FAKE, params=Sampling(max_tokens=3),
                                     timeout=60)) == [3, 1]


def test_a_fleet_serves_its_model_with_its_defaults(fake_worker: WorkerProc) -> None:
    with Fleet(FAKE, params=Sampling(max_tokens=6), timeout=60) as llm:
        assert llm.is_ready()
        assert llm.warmup()["ready"] is True
        assert [e["engine_id"] for e in llm.engines()] == [FAKE_ENGINE]
        assert llm.generate("a b").completion_tokens == 6
        assert llm.generate("a b", params={"max_tokens": 3}).completion_tokens == 3
        assert llm.generate("a b", params={"max_tokens": 3}, max_tokens=2).completion_tokens == 2
        assert llm.chat(USER).completion_tokens == 6
        with llm.stream_generate("a b", max_tokens=4) as text:
            assert "".join(text) == "a b a b"
        assert _tokens(llm.generate_batch(["a", "b"], params=Sampling(max_tokens=2))) == [2, 2]
        assert _tokens(llm.chat_batch([USER, USER])) == [6, 6]


def test_a_fleet_shuts_its_engines_down(fake_worker: WorkerProc) -> None:
    """Last: it stops the module's worker."""
    with Fleet(FAKE) as llm:
        assert llm.shutdown(wait=60) == []
        assert fake_worker.process.wait(30) == 0
        assert llm.engines() == []
        assert not llm.is_ready()


@pytest.mark.engine
def test_a_fleet_on_the_tiny_vllm_engine(workers_ab: Any) -> None:
    with Fleet(model="tiny", timeout=120) as llm:
        assert llm.is_ready()
        assert llm.warmup()["ready"] is True
        greedy = Sampling(max_tokens=8, temperature=0)
        one = llm.generate("Hello", params=greedy, max_tokens=4)
        assert one.model == "tiny"
        assert 1 <= one.completion_tokens <= 4
        assert llm.generate("Hello", params=greedy, max_tokens=4).text == one.text
        batch = llm.generate_batch([f"prompt {i}" for i in range(5)],
                                   params=Sampling(max_tokens=3, temperature=0))
        assert len(batch) == 5
        assert all(r.completion_tokens <= 3 for r in batch), _tokens(batch)
        reply = llm.chat([{"role": "user", "content": "Hi"}], params={"max_tokens": 3})
        assert reply.model == "tiny" and reply.completion_tokens <= 3
        engines = llm.engines()
        assert "a1" in {e["engine_id"] for e in engines}
        assert {e["model"] for e in engines} == {"tiny"}
