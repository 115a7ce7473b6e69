"""The worker runtime with the deterministic fake engine (unit level: no Redis, no vLLM)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from producer.errors import InvalidRequest, UnknownModel
from producer.schema import ChatRequest, GenerateRequest, Sampling
from producer.settings import ModelConfig
from tests.field_errors import assert_names_field
from workers.engines.fake import FakeEngine
from workers.runtime import Runtime


def _runtime(**config: object) -> Runtime:
    cfg = ModelConfig(model="unused", engine="fake", **config)  # type: ignore[arg-type]
    runtime = Runtime(model_id="m", engine_id="e1", config=cfg, gpus=[])
    runtime.load()
    return runtime


def test_model_defaults_fill_only_unset_knobs() -> None:
    runtime = _runtime(defaults=Sampling(max_tokens=3, temperature=0.5))
    out = runtime.handle(GenerateRequest, "t1", {"prompt": "a b", "model": "m"})
    assert out["completion_tokens"] == 3 and out["text"] == "a b a"
    out = runtime.handle(GenerateRequest, "t2", {"prompt": "a b", "model": "m", "max_tokens": 1})
    assert out["completion_tokens"] == 1
    assert out["engine_id"] == "e1" and out["model"] == "m"


def test_worker_side_checks_fail_only_the_task() -> None:
    runtime = _runtime(max_tokens_cap=8)
    with pytest.raises(InvalidRequest) as above_cap:
        runtime.handle(GenerateRequest, "t1", {"prompt": "x", "model": "m", "max_tokens": 9})
    assert_names_field(above_cap.value, "max_tokens")
    with pytest.raises(InvalidRequest) as negative:
        runtime.handle(GenerateRequest, "t2", {"prompt": "x", "model": "m", "temperature": -1})
    assert_names_field(negative.value, "temperature")
    with pytest.raises(UnknownModel, match="'other'") as other:
        runtime.handle(GenerateRequest, "t3", {"prompt": "x", "model": "other"})
    assert_names_field(other.value, "model")
    chat = {"messages": [{"role": "user", "content": "hi there"}], "model": "m"}
    # The fake engine echoes the words; vLLM's default of 16 tokens, held to the cap of 8.
    assert runtime.handle(ChatRequest, "t4", chat)["text"] == " ".join(["hi", "there"] * 4)
    assert runtime.describe()["state"] == "ready"


def test_many_request_items_fail_alone() -> None:
    runtime = _runtime(max_tokens_cap=8)
    kwargs = {"model": "m", "requests": [
        {"prompt": "one two", "max_tokens": 2},
        {"prompt": "x", "max_tokens": 99},
        {"prompt": 5},
        {"prompt": "three"},
    ]}
    out = runtime.handle_many(GenerateRequest, "t", kwargs)
    assert out[0] == {"ok": {"text": "one two", "finish_reason": "length", "prompt_tokens": 2,
                             "completion_tokens": 2, "total_tokens": 4, "model": "m",
                             "engine_id": "e1"}}
    assert out[1]["error"]["type"] == "InvalidRequest"
    assert_names_field(out[1]["error"]["message"], "max_tokens")
    assert out[2]["error"]["type"] == "InvalidRequest"
    assert_names_field(out[2]["error"]["message"], "prompt")
    assert out[3] == {"ok": {"text": " ".join(["three"] * 8), "finish_reason": "length",
                             "prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9,
                             "model": "m", "engine_id": "e1"}}  # vLLM's 16, held to the cap


def test_idle_unload_then_the_next_request_reloads() -> None:
    runtime = _runtime(idle_unload_s=1)
    kwargs = {"prompt": "a", "model": "m", "max_tokens": 1}
    runtime.handle(GenerateRequest, "t1", kwargs)
    assert runtime.unload_if_idle(3600, lambda: 0) is False  # not idle long enough
    assert runtime.unload_if_idle(0, lambda: 1) is False  # work is waiting in the queue
    assert runtime.unload_if_idle(0, lambda: 0) is True
    assert runtime.describe()["state"] == "idle-unloaded"
    assert runtime.health()["ready"] is False
    assert runtime.handle(GenerateRequest, "t2", kwargs)["completion_tokens"] == 1
    assert runtime.describe()["state"] == "ready" and runtime.loads == 2


def test_idle_sleep_keeps_the_engine_and_wakes_it_for_the_next_request() -> None:
    runtime = _runtime(idle_unload_s=1, idle_mode="sleep")
    engine = runtime.engine
    assert isinstance(engine, FakeEngine)
    kwargs = {"prompt": "a", "model": "m", "max_tokens": 1}
    runtime.handle(GenerateRequest, "t1", kwargs)
    assert runtime.unload_if_idle(0, lambda: 0) is True
    assert runtime.describe()["state"] == "idle-unloaded"
    assert runtime.engine is engine and engine.asleep is True  # not rebuilt
    assert runtime.handle(GenerateRequest, "t2", kwargs)["completion_tokens"] == 1
    assert runtime.engine is engine and engine.asleep is False
    assert runtime.describe()["state"] == "ready" and runtime.loads == 2


def test_lifecycle_tasks_reload_and_report() -> None:
    from producer.errors import UnknownModel as Unknown
    from producer.tasks import engine_status, warmup

    runtime = _runtime()
    assert runtime.unload_if_idle(0, lambda: 0) is True

    def run_task(task: Any, kwargs: dict[str, Any]) -> Any:
        # The task object as a worker's pool runs it: the app's task, with its request.
        task.push_request(id="t", redelivered=False)
        try:
            return runtime.execute(task, kwargs)
        finally:
            task.pop_request()

    report = run_task(warmup, {"model": "m"})
    assert report["ready"] is True and runtime.loads == 2
    status = run_task(engine_status, {"engine_id": "e1"})
    assert status["engine_id"] == "e1" and status["state"] == "ready"
    with pytest.raises(Unknown):
        run_task(engine_status, {"engine_id": "zz"})


def test_tool_calls_and_json_are_read_on_the_worker() -> None:
    # The fake engine echoes the conversation: a call written into it comes back as output.
    runtime = _runtime()
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}}}}
    call = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    kwargs = {"messages": [{"role": "user", "content": call}], "model": "m", "tools": [tool],
              "max_tokens": 5}  # one echo of the call's five words
    out = runtime.handle(ChatRequest, "t1", kwargs)
    assert out["finish_reason"] == "tool_calls" and out["text"] == ""
    # The id: "call_" and the first 24 hex digits of sha256("t1:0"), worked out with sha256sum.
    assert out["tool_calls"] == [{"id": "call_da4b67039c7ca8ed14115bb8", "type": "function",
                                  "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]
    assert runtime.handle(ChatRequest, "t1", kwargs) == out  # a redelivery: the same answer
    none = runtime.handle(ChatRequest, "t2", {**kwargs, "tool_choice": "none"})
    assert "tool_calls" not in none and none["text"] == call
    bad = '{"name": "get_time", "arguments": {"tz": "PST"}}'  # not in the schema's enum
    kwargs["messages"] = [{"role": "user", "content": bad}]
    assert "tool_calls" not in runtime.handle(ChatRequest, "t3", kwargs)
    as_json = runtime.handle(GenerateRequest, "t4", {"prompt": '{"a": 1}', "model": "m",
                                                     "max_tokens": 2, "return_json": True})
    assert as_json["parsed"] == {"a": 1}
    many = runtime.handle_many(ChatRequest, "t5", {"model": "m", "requests": [
        {"messages": [{"role": "user", "content": call}], "tools": [tool], "max_tokens": 5},
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
    ]})
    assert many[0]["ok"]["tool_calls"] == [{  # request id "t5:0": sha256("t5:0:0")
        "id": "call_e29d0f528e07feadf13d48e5", "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]
    assert many[1]["error"]["type"] == "InvalidRequest"
    assert_names_field(many[1]["error"]["message"], "tool_choice")


class _Revoked:
    """The revoked set as the watcher asks it; counting the watcher's looks at a task that is
    never revoked lets a test wait for whole watcher cycles instead of sleeping."""

    SENTINEL = "sentinel"

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.looks = 0
        self.looked = threading.Condition()

    def __call__(self, task_id: str) -> bool:
        with self.looked:
            if task_id == self.SENTINEL:
                self.looks += 1
                self.looked.notify_all()
            return task_id in self.ids

    def add(self, task_id: str) -> None:
        with self.looked:
            self.ids.add(task_id)

    def full_cycle(self) -> None:
        """Return once a cycle that began after this call has looked at every watched task.

        The sentinel is watched first, so it is looked at first in each cycle: the next look
        may belong to a cycle already under way, the one after it to a cycle that began after
        this call, and the third comes after that cycle has finished."""
        with self.looked:
            target = self.looks + 3
            assert self.looked.wait_for(lambda: self.looks >= target, timeout=5)


def test_revoke_watcher_aborts_only_revoked_running_tasks() -> None:
    from workers.revoke import RevokeWatcher

    class Recorder:
        def __init__(self) -> None:
            self.aborted: list[list[str]] = []
            self.event = threading.Event()

        def abort(self, request_ids: list[str]) -> None:
            self.aborted.append(list(request_ids))
            self.event.set()

    revoked = _Revoked()
    watcher = RevokeWatcher(interval=0.01, revoked=revoked)
    engine: Any = Recorder()  # only abort() is called
    with watcher.watching(revoked.SENTINEL, engine, ["never"]):
        with watcher.watching("t1", engine, ["t1:0", "t1:1"]), \
                watcher.watching("t2", engine, ["t2"]):
            revoked.add("t2")
            assert engine.event.wait(5)
            revoked.full_cycle()  # t1 runs on, not revoked: looked at and left alone
            assert engine.aborted == [["t2"]]
        revoked.full_cycle()  # no cycle still holds t1 from before it left
        revoked.add("t1")  # revoked after it left the engine: nothing to abort
        revoked.full_cycle()
    assert engine.aborted == [["t2"]]


def test_revoke_watcher_leaves_alone_a_task_that_left_during_its_look() -> None:
    """A task revoked just as it leaves the engine: the watcher's snapshot still holds it, but
    its requests are gone: no abort."""
    from workers.revoke import RevokeWatcher

    aborted: list[list[str]] = []
    looks: list[str] = []
    cycle_after = threading.Event()

    class Engine:
        def abort(self, request_ids: list[str]) -> None:
            aborted.append(list(request_ids))

    def revoked(task_id: str) -> bool:
        if task_id == "t1":
            leaving.__exit__(None, None, None)  # the task leaves the engine during the look
        elif "t1" in looks:
            cycle_after.set()  # the sentinel, looked at first in the cycle after t1's
        looks.append(task_id)
        return task_id == "t1"

    watcher = RevokeWatcher(interval=0.01, revoked=revoked)
    engine: Any = Engine()
    with watcher.watching("sentinel", engine, ["never"]):
        leaving = watcher.watching("t1", engine, ["t1"])
        leaving.__enter__()
        assert cycle_after.wait(5)
    assert aborted == []


def test_a_request_without_max_tokens_is_held_to_the_cap() -> None:
    # The fake engine echoes the prompt until max_tokens: vLLM's default of 16 would give 16.
    runtime = _runtime(max_tokens_cap=4)
    out = runtime.handle(GenerateRequest, "t1", {"prompt": "a b", "model": "m"})
    assert out["completion_tokens"] == 4
    assert _runtime().handle(GenerateRequest, "t2", {"prompt": "a b", "model": "m"}
                             )["completion_tokens"] == 16
