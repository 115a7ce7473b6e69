"""The vLLM engine thread's own logic (inbox, pings, failures) around a stand-in LLMEngine.

The stand-in replaces only vLLM's LLMEngine object, to make a hung or dying engine happen on
demand; the real engine runs in tests/test_fleet.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from producer.errors import EngineFailed, InvalidRequest
from producer.settings import ModelConfig
from tests.required import require_module
from workers.engines.base import EngineRequest
from workers.engines.vllm import VLLMEngine

require_module("vllm")


class StandInLLMEngine:
    """Finishes each request one step after it was added; `step` can be made to hang or die."""

    def __init__(self) -> None:
        self.model_config = SimpleNamespace(max_model_len=64)
        self.engine_core = SimpleNamespace(shutdown=lambda: None)
        self.gate = threading.Event()
        self.gate.set()
        self.stepping = threading.Event()
        self.die = False
        self.waiting: list[str] = []
        self.tokenizer_calls: list[int] = []

    def get_tokenizer(self) -> Any:
        def tokenize(texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
            self.tokenizer_calls.append(len(texts))
            if any("refused" in text for text in texts):
                raise ValueError("the tokenizer refuses this text")
            return {"input_ids": [list(range(len(text.split()))) for text in texts]}

        return tokenize

    def add_request(self, request_id: str, prompt: Any, params: Any, priority: int = 0) -> None:
        self.waiting.append(request_id)

    def step(self) -> list[Any]:
        self.stepping.set()
        self.gate.wait()
        if self.die:
            raise RuntimeError("engine core died")
        done, self.waiting = self.waiting, []
        out = SimpleNamespace(text="ok", finish_reason="length", token_ids=[1])
        return [SimpleNamespace(request_id=r, finished=True, outputs=[out]) for r in done]


@pytest.fixture
def engine() -> Any:
    stand_in = StandInLLMEngine()
    eng = VLLMEngine("m", ModelConfig(model="unused"), tensor_parallel_size=1)
    eng._build = lambda: stand_in  # type: ignore[method-assign]
    eng.start()
    yield eng, stand_in
    stand_in.gate.set()
    eng.close()


def _request(i: int) -> EngineRequest:
    return EngineRequest(f"r{i}", {"max_tokens": 1}, prompt=f"word {i}")


def test_ping_tells_a_hung_engine_from_a_live_one(engine: Any) -> None:
    eng, stand_in = engine
    assert eng.ping(2.0)
    stand_in.gate.clear()  # the next step hangs
    stand_in.stepping.clear()
    future = eng.submit([_request(1)])[0]
    assert stand_in.stepping.wait(30)
    assert not eng.ping(0.5)
    stand_in.gate.set()
    assert future.result(timeout=5).text == "ok"
    assert eng.ping(2.0)


def test_a_dying_engine_fails_every_waiting_request_and_reports_not_ready(engine: Any) -> None:
    eng, stand_in = engine
    stand_in.gate.clear()
    futures = eng.submit([_request(1), _request(2)])
    stand_in.die = True
    stand_in.gate.set()
    for future in futures:
        with pytest.raises(EngineFailed, match="died"):
            future.result(timeout=5)
    assert not eng.ping(0.5)
    with pytest.raises(EngineFailed):
        eng.submit([_request(3)])[0].result(timeout=5)


def test_what_arrives_together_is_tokenized_in_one_call(engine: Any) -> None:
    eng, stand_in = engine
    stand_in.gate.clear()  # hold the engine in a step while the next requests arrive
    stand_in.stepping.clear()
    first = eng.submit([_request(0)])[0]
    assert stand_in.stepping.wait(30)
    calls = len(stand_in.tokenizer_calls)
    futures = eng.submit([_request(i) for i in range(1, 9)])
    stand_in.gate.set()
    assert [f.result(timeout=5).text for f in [first, *futures]] == ["ok"] * 9
    assert stand_in.tokenizer_calls[calls:] == [8]


def test_a_text_the_tokenizer_refuses_fails_alone(engine: Any) -> None:
    eng, stand_in = engine
    stand_in.gate.clear()
    stand_in.stepping.clear()
    first = eng.submit([_request(0)])[0]
    assert stand_in.stepping.wait(30)
    bad = EngineRequest("bad", {"max_tokens": 1}, prompt="refused words")
    futures = eng.submit([_request(1), bad, _request(2)])
    stand_in.gate.set()
    assert first.result(timeout=5).text == "ok"
    assert futures[0].result(timeout=5).text == "ok"
    assert futures[2].result(timeout=5).text == "ok"
    with pytest.raises(InvalidRequest, match="ValueError: the tokenizer refuses"):
        futures[1].result(timeout=5)
    assert eng.ping(2.0)  # the engine lives on
