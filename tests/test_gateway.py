"""The OpenAI gateway, driven by the official ``openai`` SDK and curl, in front of a real worker
on the fake engine (its text is checkable: the prompt's words echoed). What the gateway does
with the real engine (tools, JSON, logprobs, streaming equal to the whole text, vLLM's own
server's shapes, a disconnect aborting the engine) is in tests/test_gateway_vllm.py.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import (
    GATEWAY_KEY,
    Fleet,
    GatewayProc,
    queued,
    start_gateway,
    wait_until,
)
from tests.required import require_module, require_program

MODEL = "gw-fake"
SLOW = "gw-slow"  # the fake engine streaming a word every 0.1 s (tests/slow_stream.py)
ALIAS = "test-org/gw-fake"
HELLO = [{"role": "user", "content": "hello gateway world"}]


@pytest.fixture(scope="module")
def fake_fleet(fleet_env: dict[str, str], app: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("gw-logs"))
    fleet.wait_ready(app, fleet.start(MODEL, "gwfake1"))
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="module")
def gateway(fake_fleet: Fleet, fleet_env: dict[str, str]) -> Iterator[GatewayProc]:
    gw = start_gateway(fleet_env, fake_fleet.logdir)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: GatewayProc) -> Any:
    require_module("openai")
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)


def _words(n: int, words: str = "hello gateway world") -> str:
    cycle = words.split() * n
    return " ".join(cycle[:n])


def test_models_lists_live_models_with_aliases(client: Any) -> None:
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models and ALIAS in models
    assert "gw-none" not in models  # configured, but no engine is live
    entry = models[MODEL].model_dump()
    assert entry["object"] == "model" and entry["owned_by"] and entry["created"] > 0
    assert entry["max_model_len"] == 4096  # the fake engine's context


def test_chat_and_completions(client: Any) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == _words(5)
    assert chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 5)

    one = client.completions.create(model=ALIAS, prompt="a b", max_tokens=3)
    assert one.model == ALIAS and one.object == "text_completion"
    assert [c.text for c in one.choices] == ["a b a"]
    many = client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=3)
    assert [(c.index, c.text) for c in many.choices] == [(0, "a b a"), (1, "c c c")]
    assert many.usage.completion_tokens == 6


def test_max_completion_tokens_is_max_tokens(client: Any) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=2)
    assert chat.usage.completion_tokens == 2


def test_streamed_chat_equals_the_whole_text(client: Any) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=9)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=9, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.id == chunks[0].id for c in chunks)


def test_streamed_completions_of_a_prompt_list(client: Any) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=["x y", "z"], max_tokens=3,
                                            stream=True))
    texts: dict[int, str] = {}
    finished = {}
    for chunk in chunks:
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert texts == {0: "x y x", 1: "z z z"}
    assert finished == {0: "length", 1: "length"}


def test_sse_framing_with_curl(gateway: GatewayProc) -> None:
    require_program("curl")
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True})
    out = subprocess.run(
        ["curl", "-sN", gateway.url + "/v1/chat/completions", "-H",
         f"Authorization: Bearer {GATEWAY_KEY}", "-H", "Content-Type: application/json",
         "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    first = json.loads(events[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_errors_are_the_sdks_own_classes(client: Any, gateway: GatewayProc) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=7000)
    assert bad.value.body["param"] == "temperature" and "100" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=0)
    assert bad.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "bob", "content": "x"}])
    assert bad.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO,
                                       extra_body={"priority": "urgent"})
    assert bad.value.body["param"] == "priority" and "interactive" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=2)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", echo=True)
    assert bad.value.body["param"] == "echo"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as unavailable:
        client.chat.completions.create(model="gw-none", messages=HELLO)
    assert unavailable.value.status_code == 503
    assert unavailable.value.response.headers["retry-after"].isdigit()
    for key in ("wrong-key", ""):
        other = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            other = other.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as denied:
            other.models.list()
        assert set(denied.value.body) == {"message", "type", "param", "code"}


def test_too_large_is_413_and_nothing_is_sent(client: Any, fleet_env: dict[str, str],
                                              redis_client: Any) -> None:
    import openai

    from producer.naming import model_queue

    before = len(queued(redis_client, model_queue(MODEL)))
    with pytest.raises(openai.APIStatusError) as large:
        client.completions.create(model=MODEL, prompt="x " * 5_000_000, max_tokens=1)
    assert large.value.status_code == 413
    assert len(queued(redis_client, model_queue(MODEL))) == before


def test_unknown_fields_are_ignored_and_logged(client: Any, gateway: GatewayProc) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                          user="someone", extra_body={"frobnicate": 1})
    assert chat.choices[0].message.content == _words(2)
    wait_until(lambda: "frobnicate" in gateway.log(), 10, "the ignored field in the log")


def test_health_and_metrics(gateway: GatewayProc) -> None:
    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(gateway.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    assert get("/health")[0] == 200
    assert get(f"/health?model={ALIAS}")[0] == 200
    assert get("/health?model=gw-none")[0] == 503
    status, text = get("/metrics")
    assert status == 200
    assert f'fleet_gateway_requests_total{{endpoint="chat",model="{MODEL}",status="200"}}' in text
    assert 'status="400"' in text
    assert f'vllm:e2e_request_latency_seconds_count{{model_name="{MODEL}"}}' in text
    assert f'vllm:time_to_first_token_seconds_count{{model_name="{MODEL}"}}' in text


def test_python_stream_helpers(fake_fleet: Fleet, app: Any) -> None:
    from producer.client import stream_chat, stream_generate

    with stream_generate("one two three", model=MODEL, max_tokens=7, timeout=60) as text:
        pieces = list(text)
    assert "".join(pieces) == "one two three one two three one" == text.completion.text
    with stream_chat(HELLO, model=MODEL, max_tokens=4, timeout=60) as text:
        assert "".join(text) == _words(4)
    assert text.completion.finish_reason == "length"


def test_stream_entries_coalesce_and_a_second_run_breaks_the_stream(redis_client: Any) -> None:
    """The worker's writer joins pieces queued together; a reader refuses a second run's text
    (a redelivered task) and a gap, rather than splice."""
    from producer.errors import StreamBroken
    from producer.naming import stream_key
    from producer.streams import Following
    from workers.streams import StreamWriter

    writer = StreamWriter(redis_client, ttl_s=60)
    first = writer.opener("t-stream")
    for piece in ("a", "b", "c"):
        first("piece-" + piece + " ")
    writer.flush()
    first("tail")
    writer.end(["t-stream"])
    writer.flush()
    entries = redis_client.xrange(stream_key("t-stream"))
    assert len(entries) == 3  # three pieces in one entry, the tail, the end mark
    assert 0 < redis_client.ttl(stream_key("t-stream")) <= 60
    following = Following()
    texts = [following.take(i, f) for i, f in entries]
    assert texts == ["piece-a piece-b piece-c ", "tail", None]

    second = writer.opener("t-stream")  # a second run of the same task
    second("again")
    writer.flush()
    new = redis_client.xrange(stream_key("t-stream"), min=b"(" + entries[-1][0])
    with pytest.raises(StreamBroken, match="another one started"):
        following.take(*new[0])
    reader = Following()
    reader.take(*entries[0])
    with pytest.raises(StreamBroken, match="entries were lost"):
        reader.take(b"9-9", {b"a": entries[0][1][b"a"], b"o": b"999", b"t": b"x"})
    assert writer.started(["t-stream", "t-never"]) == [True, False]


def test_pieces_wait_for_the_interval_but_a_first_piece_and_an_end_do_not(
        redis_client: Any) -> None:
    """With an interval, the text made meanwhile leaves in one entry; a stream's first piece
    and its end mark leave at once, however recently the writer sent."""
    from producer.naming import stream_key
    from workers.streams import StreamWriter

    writer = StreamWriter(redis_client, ttl_s=60, interval_s=2.0)
    writer.start()
    try:
        key = stream_key("t-interval")
        on_text = writer.opener("t-interval")
        on_text("first")
        wait_until(lambda: redis_client.xlen(key) == 1, 1.5, "the first piece, before the interval")
        for piece in (" b", " c", " d"):
            on_text(piece)
        wait_until(lambda: redis_client.xlen(key) == 2, 5, "the held pieces")
        assert redis_client.xrange(key)[1][1][b"t"] == b" b c d"  # one entry for the three
        writer.end(["t-interval"])
        wait_until(lambda: redis_client.xlen(key) == 3, 1.5, "the end mark, before the interval")
    finally:
        writer.stop()


def test_a_worker_lost_mid_stream_ends_the_stream_with_an_error(
        fleet_env: dict[str, str], app: Any, gateway: GatewayProc,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGKILL the worker while the client reads its text: once the task is redelivered, the
    stream ends with an error event and [DONE], never with the text started again."""
    import httpx

    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("gw-slow"))
    try:
        first = fleet.start(SLOW, "gwslow1", include="tests.slow_stream")
        fleet.wait_ready(app, first)
        body = {"model": SLOW, "messages": HELLO, "max_tokens": 200, "stream": True}
        headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
        events: list[str] = []
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                          headers=headers, timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                if len(events) == 3:  # the role chunk and two pieces of text
                    fleet.kill(first)
                    fleet.wait_ready(app, fleet.start(SLOW, "gwslow2",
                                                      include="tests.slow_stream"))
                    break
            events += [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert "lost mid-stream" in error["error"]["message"], events[-4:]
        texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
        assert all(texts) and len(texts) < 200  # the first run's text only, never again
    finally:
        fleet.stop_all()


def test_priority_from_the_body_or_the_key_reaches_the_task(
        fleet_env: dict[str, str], app: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """vLLM's ``priority`` field is passed on; without it a key's own priority
    (FLEET_GATEWAY_KEY_PRIORITIES) is the task's. Read from the tasks the worker holds while
    the slow fake engine streams them."""
    import threading

    import httpx

    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("gw-priority"))
    worker = fleet.start(SLOW, "gwprio1", include="tests.slow_stream")
    gw = start_gateway({**fleet_env, "FLEET_GATEWAY_KEY_PRIORITIES": '{"tests": "batch"}'},
                       fleet.logdir, "gateway-priorities")
    try:
        fleet.wait_ready(app, worker)
        bodies = [{"model": SLOW, "messages": HELLO, "max_tokens": 40, "stream": True},
                  {"model": SLOW, "messages": HELLO, "max_tokens": 40, "stream": True,
                   "priority": "interactive"}]

        def send(body: dict[str, Any]) -> None:
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {GATEWAY_KEY}"}) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():
                    pass

        threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
        for thread in threads:
            thread.start()
        held: list[Any] = []

        def both_held() -> bool:
            active = app.control.inspect(destination=[worker.node], timeout=1).active() or {}
            held[:] = [task["kwargs"].get("priority") for task in active.get(worker.node, [])]
            return len(held) == 2

        wait_until(both_held, 20, "the worker to hold both streaming tasks")
        assert sorted(held) == [0, 9]  # the body's interactive, the key's batch
        for thread in threads:
            thread.join(60)
    finally:
        gw.stop()
        fleet.stop_all()


def test_an_engine_that_misses_one_answer_stays_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose reply misses a broadcast's window is kept from its last answer for a
    while, not dropped (its model would answer 503 until the next refresh); one that stays
    silent is dropped. The broadcast is replaced by a list of answers, the clock by refreshes
    0.11 s apart."""
    import asyncio
    import types

    from producer import engines
    from producer.gateway import models

    one = {"engine_id": "e1", "model": "m", "state": "ready"}
    two = {"engine_id": "e2", "model": "m", "state": "ready"}
    answers = [[one, two], [two], [two], [two]]
    monkeypatch.setattr(engines, "list_engines", lambda timeout: answers.pop(0))
    clock = [100.0]
    monkeypatch.setattr(models, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                              time=time.time))
    directory = models.ModelDirectory(settings=None, refresh_s=0.1)  # type: ignore[arg-type]
    listed = []
    for _ in range(4):
        asyncio.run(directory.refresh())
        listed.append(sorted(e["engine_id"] for e in directory.live("m")))
        clock[0] += 0.11
    assert listed[:2] == [["e1", "e2"], ["e1", "e2"]]
    assert listed[-1] == ["e2"]
