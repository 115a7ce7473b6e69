"""The fleet end to end: real Redis, real `fleet worker` processes, the real vLLM CPU engine."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from producer import PromptTooLong, generate
from producer.client import chat_batch, generate_batch
from producer.client import generate as generate_blocking
from tests.harness import (
    PROBE,
    Fleet,
    WorkerProc,
    alive,
    drop_queue,
    engine_info,
    engine_probe,
    queued,
    wait_until,
)

pytestmark = pytest.mark.engine

TIMEOUT = 120


class _Tokenizer:
    """The model's tokenizer as Hugging Face loads it (which is what vLLM uses)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))

    def count(self, text: str) -> int:
        return len(self.hf.encode(text, add_special_tokens=False))


def _tokenizer(tiny_dir: Path) -> _Tokenizer:
    return _Tokenizer(tiny_dir)


def _run_app(code: str, env: dict[str, str]) -> Any:
    """Run an application in its own process; it prints one JSON document."""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT + 30)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_delay_from_a_separate_process(
    workers_ab: tuple[WorkerProc, WorkerProc], fleet_env: dict[str, str], tiny_dir: Path
) -> None:
    code = (
        "import json\n"
        "from producer import generate, chat\n"
        "g = generate.delay('Write a haiku', model='tiny', temperature=0.3, max_tokens=12)\n"
        "c = chat.delay([{'role': 'user', 'content': 'hi'}], model='tiny', max_tokens=7)\n"
        f"print(json.dumps([g.get(timeout={TIMEOUT}), c.get(timeout={TIMEOUT})]))\n"
    )
    gen, cht = _run_app(code, fleet_env)
    tok = _tokenizer(tiny_dir)
    for result, max_tokens in ((gen, 12), (cht, 7)):
        assert set(result) >= {"text", "prompt_tokens", "completion_tokens", "total_tokens",
                               "finish_reason", "model", "engine_id"}
        assert result["model"] == "tiny" and result["engine_id"] == "a1"
        assert result["finish_reason"] in ("stop", "length")
        if result["finish_reason"] == "length":
            assert result["completion_tokens"] == max_tokens
        assert result["total_tokens"] == result["prompt_tokens"] + result["completion_tokens"]
    assert gen["prompt_tokens"] == tok.count("Write a haiku")
    rendered = tok.hf.apply_chat_template([{"role": "user", "content": "hi"}],
                                          add_generation_prompt=True, tokenize=False)
    assert cht["prompt_tokens"] == tok.count(rendered)


def test_200_requests_batch_in_order_and_engine_batches(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any, tiny_dir: Path
) -> None:
    a, _ = workers_ab
    tok = _tokenizer(tiny_dir)
    # Every prompt a different length, so a result's prompt_tokens names its prompt.
    prompts = [f"{i} " + " ".join(["word"] * (i + 1)) for i in range(200)]
    lengths = [tok.count(p) for p in prompts]
    assert len(set(lengths)) == len(prompts)
    engine_probe(app, a.node, reset=True)
    results = generate_batch(prompts, model="tiny", max_tokens=16, temperature=0.0,
                             timeout=TIMEOUT)
    assert [r.prompt_tokens for r in results] == lengths  # in input order
    assert {r.engine_id for r in results} == {"a1"}
    assert engine_probe(app, a.node, reset=True)["peak_unfinished"] > 1  # vLLM ran many at once
    # the same 200 as individual .delay() tasks: every one completes, in order of its handle,
    # and the engine runs many of them at once
    handles = [generate.delay(p, model="tiny", max_tokens=16, temperature=0.0) for p in prompts]
    singles = [h.get(timeout=TIMEOUT) for h in handles]
    assert [r["prompt_tokens"] for r in singles] == lengths
    assert [r["text"] for r in singles] == [r.text for r in results]  # greedy: same answers
    assert engine_probe(app, a.node)["peak_unfinished"] > 1


def test_many_task_and_helpers_from_several_threads(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from producer import generate_many

    value = generate_many.delay(
        [{"prompt": "first", "max_tokens": 2, "temperature": 0.0}, {"prompt": "z " * 2000},
         {"prompt": "third"}],
        model="tiny",
    ).get(timeout=TIMEOUT)
    assert value[0]["ok"]["completion_tokens"] == 2
    assert value[1]["error"]["type"] == "PromptTooLong"
    assert value[2]["ok"]["engine_id"] == "a1"

    def work(n: int) -> list[int]:
        prompts = [f"thread {n} item {i}" for i in range(20)]
        got = generate_batch(prompts, model="tiny", max_tokens=1 + n, chunk_size=7,
                             temperature=0.0, timeout=TIMEOUT)
        single = generate_blocking(f"thread {n}", model="tiny", max_tokens=1 + n,
                                   temperature=0.0, timeout=TIMEOUT)
        return [r.completion_tokens for r in [*got, single]]

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(work, range(4)))
    for n, counts in enumerate(outputs):
        assert len(counts) == 21 and set(counts) == {1 + n}


def test_temperature_zero_and_seed_are_deterministic(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    greedy = [generate_blocking("The same prompt", model="tiny", temperature=0.0,
                                max_tokens=24, timeout=TIMEOUT).text for _ in range(2)]
    assert greedy[0] == greedy[1] != ""
    seeded = generate_batch(["Seeded prompt"] * 3, model="tiny", temperature=1.0, seed=1234,
                            max_tokens=24, timeout=TIMEOUT)
    assert len({r.text for r in seeded}) == 1
    others = generate_batch(["Seeded prompt"] * 4, model="tiny", temperature=1.0,
                            seed=None, max_tokens=24, timeout=TIMEOUT)
    assert len({r.text for r in others} | {seeded[0].text}) > 1  # sampling really samples


def test_over_long_prompt_in_a_batch_fails_alone(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    prompts = ["short one", "x " * 2000, "short two"]
    results = generate_batch(prompts, model="tiny", max_tokens=4, temperature=0.0,
                             timeout=TIMEOUT, return_exceptions=True)
    assert isinstance(results[1], PromptTooLong)
    assert "prompt" in str(results[1]) and "512" in str(results[1])
    assert results[0].completion_tokens == 4 and results[2].completion_tokens == 4
    with pytest.raises(PromptTooLong):
        generate.delay("y " * 2000, model="tiny").get(timeout=TIMEOUT)


def test_max_tokens_above_model_cap_fails_with_field_name(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    from producer import InvalidRequest

    with pytest.raises(InvalidRequest, match="max_tokens"):
        generate.delay("hi", model="tiny", max_tokens=100_000).get(timeout=TIMEOUT)


def test_chat_batch_and_model_defaults(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}]
             for i in range(5)]
    results = chat_batch(convs, model="tiny-b", timeout=TIMEOUT)
    # tiny-b's configured default is max_tokens = 5
    assert all(r.engine_id == "b1" and r.completion_tokens <= 5 for r in results)
    assert any(r.completion_tokens == 5 for r in results)


def test_routing_by_model(workers_ab: tuple[WorkerProc, WorkerProc], app: Any) -> None:
    handles = [(m, generate.delay(f"route {i}", model=m, max_tokens=2))
               for i in range(10) for m in ("tiny", "tiny-b")]
    for model, handle in handles:
        result = handle.get(timeout=TIMEOUT)
        assert result["model"] == model
        assert result["engine_id"] == {"tiny": "a1", "tiny-b": "b1"}[model]


def test_worker_pinning_and_node_names(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    a, b = workers_ab
    info_b = engine_info(app, b.node)
    assert info_b["gpus"] == ["0"] and info_b["cuda_visible_devices"] == "0"
    assert info_b["state"] == "ready" and info_b["model"] == "tiny-b"
    assert engine_info(app, a.node)["engine_id"] == "a1"


def test_engine_health_and_stats_come_from_the_engine(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    a, _ = workers_ab
    replies = app.control.broadcast("engine_health", destination=[a.node], reply=True,
                                    timeout=5.0, arguments={"timeout": 3.0})
    assert replies and replies[0][a.node]["ready"] is True
    stats = app.control.inspect(destination=[a.node], timeout=3.0).stats()
    assert stats[a.node]["engine"]["model"] == "tiny"  # what Flower's worker page shows


def test_wait_for_engine(workers_ab: tuple[WorkerProc, WorkerProc], app: Any) -> None:
    from producer import NoEngine
    from producer.client import wait_for_engine

    assert "b1@test" in wait_for_engine("tiny-b", timeout=10)
    with pytest.raises(NoEngine, match="nobody"):
        wait_for_engine("nobody", timeout=1)


def test_lifecycle_tasks_through_the_result_backend(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    from producer import InvalidRequest, engine_status, warmup

    report = warmup.delay("tiny").get(timeout=TIMEOUT)
    assert report == {"engine_id": "a1", "model": "tiny", "state": "ready", "ready": True}
    status = engine_status.delay("b1").get(timeout=TIMEOUT)
    assert status["model"] == "tiny-b" and status["gpus"] == ["0"]
    with pytest.raises(InvalidRequest, match="engine_id"):
        engine_status.delay("bad id")


def test_engines_listing(workers_ab: tuple[WorkerProc, WorkerProc], fleet_env: dict[str, str],
                         app: Any) -> None:
    from producer.engines import list_engines

    before = {e["engine_id"]: e for e in list_engines(timeout=2.0)}
    burst = [generate.delay(f"listed {i}", model="tiny", max_tokens=400) for i in range(120)]
    time.sleep(0.3)
    during = {e["engine_id"]: e for e in list_engines(timeout=2.0)}
    assert during["a1"]["in_flight"] + during["a1"]["queue_depth"] > 0  # seen under load
    for h in burst:
        h.get(timeout=TIMEOUT)
    engines = {e["engine_id"]: e for e in list_engines(timeout=2.0)}
    assert {"a1", "b1"} <= set(engines)
    assert engines["a1"]["requests_served"] >= before["a1"]["requests_served"] + 120
    assert engines["a1"]["in_flight"] == 0
    assert engines["b1"]["model"] == "tiny-b" and engines["b1"]["node"] == "b1@test"
    assert engines["a1"]["state"] == "ready" and engines["a1"]["queue_depth"] == 0
    out = subprocess.run([sys.executable, "-m", "producer.cli", "engines", "--json",
                          "--model", "tiny-b", "--timeout", "2"], env=fleet_env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert [e["engine_id"] for e in json.loads(out.stdout)] == ["b1"]


def test_health_command_answers_for_one_engine(workers_ab: tuple[WorkerProc, WorkerProc],
                                               fleet_env: dict[str, str]) -> None:
    def health(engine_id: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", "health", engine_id,
                               "--timeout", "3"], env=fleet_env, capture_output=True, text=True,
                              timeout=60)

    ready = health("b1")
    assert ready.returncode == 0 and ready.stdout.strip() == "b1: ready"
    missing = health("nobody")
    assert missing.returncode == 1 and "no answer" in missing.stdout


def test_unserved_model_waits_in_its_queue_until_an_engine_comes(
    workers_ab: tuple[WorkerProc, WorkerProc], fleet: Fleet, app: Any, redis_client: Any
) -> None:
    handle = generate.delay("anyone there?", model="tiny-late", max_tokens=3, temperature=0.0)
    with pytest.raises(CeleryTimeout):
        handle.get(timeout=2)
    assert len(queued(redis_client, "fleet.model.tiny-late")) == 1  # parked, not lost
    late = fleet.start("tiny-late", "late1")
    fleet.wait_ready(app, late)
    result = handle.get(timeout=TIMEOUT)
    assert result["engine_id"] == "late1" and result["completion_tokens"] == 3
    tree = late.tree()
    assert tree
    out = subprocess.run([sys.executable, "-m", "producer.cli", "shutdown", "--model",
                          "tiny-late"], env=fleet.env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "late1@test" in out.stdout
    assert late.process.wait(timeout=60) == 0
    assert not alive(tree)


def test_idle_unload_reload_and_drain(
    workers_ab: tuple[WorkerProc, WorkerProc], fleet: Fleet, app: Any, redis_client: Any
) -> None:
    idle = fleet.start("tiny-idle", "idle1")
    fleet.wait_ready(app, idle)
    first = generate.delay("before", model="tiny-idle", max_tokens=3, temperature=0.0)
    assert first.get(timeout=TIMEOUT)["completion_tokens"] == 3
    deadline = time.monotonic() + 60
    while (info := engine_info(app, idle.node))["state"] != "idle-unloaded":
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    loads = info["loads"]
    again = generate.delay("before", model="tiny-idle", max_tokens=3, temperature=0.0)
    result = again.get(timeout=TIMEOUT)
    assert result["text"] == first.get()["text"]  # same engine settings, same greedy answer
    assert engine_info(app, idle.node)["loads"] == loads + 1  # reloaded once, for this task
    assert len(idle.tree()) == 1  # in-process engine: no child process
    # `fleet drain`: stop taking tasks, finish those taken, exit; the rest wait in the queue
    burst = [generate.delay(f"drain {i}", model="tiny-idle", max_tokens=480) for i in range(200)]
    wait_until(lambda: engine_info(app, idle.node)["in_flight"] > 0, 60, "it took work")
    tree = idle.tree()
    states = set()
    draining = subprocess.Popen([sys.executable, "-m", "producer.cli", "drain", "idle1"],
                                env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    while draining.poll() is None:
        with contextlib.suppress(LookupError):
            states.add(engine_info(app, idle.node)["state"])
        time.sleep(0.1)
    out = draining.stdout.read() if draining.stdout else ""
    assert draining.returncode == 0, out  # it exited in time
    assert "draining idle1@test" in out
    assert idle.process.wait(timeout=60) == 0
    assert "draining" in states  # the listing shows it
    assert not alive(tree)
    done = {h.id for h in burst if h.ready()}
    assert done  # it had taken work, and finished it before exiting
    assert {AsyncResult(i, app=app).get()["engine_id"] for i in done} == {"idle1"}
    waiting = {json.loads(m)["headers"]["id"]
               for m in queued(redis_client, "fleet.model.tiny-idle")}
    assert not done & waiting and done | waiting == {h.id for h in burst}  # none lost
    drop_queue(redis_client, "fleet.model.tiny-idle")


def test_control_shutdown_stops_exactly_one_engine(
    workers_ab: tuple[WorkerProc, WorkerProc], fleet: Fleet, app: Any
) -> None:
    a1, b1 = workers_ab
    a2 = fleet.start("tiny", "a2", include=PROBE)
    fleet.wait_ready(app, a2)
    tree = a2.tree()
    burst = [generate.delay(f"burst {i}", model="tiny", max_tokens=64, temperature=0.0)
             for i in range(150)]
    ids = {h.id for h in burst}
    # Mid-burst: a2's engine itself holds some of these requests.
    wait_until(lambda: engine_probe(app, a2.node)["unfinished"] > 0, 60, "a2 generates")
    held = set(engine_probe(app, a2.node)["added"]) & ids
    assert held
    # A node that shuts down sends no reply, so the command itself reports "no nodes replied".
    subprocess.run(
        [sys.executable, "-m", "celery", "-A", "producer", "control", "shutdown", "-d", a2.node],
        env=fleet.env, capture_output=True, timeout=60,
    )
    assert a2.process.wait(timeout=120) == 0, a2.log()[-3000:]
    results = {h.id: h.get(timeout=TIMEOUT) for h in burst}  # nothing lost
    assert len(results) == 150
    assert {results[i]["engine_id"] for i in held} == {"a2"}  # what it held, it finished
    assert {r["engine_id"] for r in results.values()} == {"a1", "a2"}
    assert not alive(tree)  # no orphan
    # the other engines keep serving
    assert a1.process.poll() is None and b1.process.poll() is None
    assert generate.delay("still there", model="tiny", max_tokens=2).get(timeout=TIMEOUT)[
        "engine_id"] == "a1"
    assert generate.delay("still there", model="tiny-b", max_tokens=2).get(timeout=TIMEOUT)[
        "engine_id"] == "b1"
