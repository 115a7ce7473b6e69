"""One contract, two engines: the fake stand-in and the real vLLM engine behave the same.

The fake engine answers the fleet's fast tests and the queue benchmarks; these checks run
against both, so the stand-in cannot drift from what the real engine does with a request.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import pytest

from producer.errors import EngineFailed, InvalidRequest, PromptTooLong
from producer.schema import DEFAULT_MAX_TOKENS
from producer.settings import ModelConfig, tiny_model_config
from workers.engines import build_engine
from workers.engines.base import Engine, EngineOutput, EngineRequest

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module", params=["fake", pytest.param("vllm", marks=pytest.mark.engine)])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Engine]:
    if request.param == "fake":
        config = ModelConfig(model="unused", engine="fake", max_model_len=MAX_MODEL_LEN)
    else:
        from tests.required import require_module
        from workers.tiny_model import ensure_tiny_model

        require_module("vllm")
        tiny = ensure_tiny_model(Path(tmp_path_factory.mktemp("m")) / "tiny")
        config = tiny_model_config(tiny).model_copy(update={"max_model_len": MAX_MODEL_LEN})
    built = build_engine("m", config, tensor_parallel_size=1)
    built.start()
    yield built
    built.close()


def _outputs(engine: Engine, *requests: EngineRequest) -> list[EngineOutput | BaseException]:
    futures = engine.submit(list(requests))
    wait(futures, timeout=120)
    return [f.exception() or f.result() for f in futures]


def _ask(request_id: str, prompt: str, **sampling: object) -> EngineRequest:
    return EngineRequest(request_id, {"temperature": 0.0, "ignore_eos": True, **sampling},
                         prompt=prompt)


def test_each_request_gets_exactly_its_tokens(engine: Engine) -> None:
    outs = _outputs(engine, *(_ask(f"n{n}", f"count to {n}", max_tokens=n) for n in (1, 3, 7)))
    for n, out in zip((1, 3, 7), outs, strict=True):
        assert isinstance(out, EngineOutput), out
        assert (out.completion_tokens, out.finish_reason) == (n, "length")
        assert out.prompt_tokens >= 3 and isinstance(out.text, str)


def test_without_max_tokens_vllms_default_applies(engine: Engine) -> None:
    (out,) = _outputs(engine, _ask("default", "how many tokens"))
    assert isinstance(out, EngineOutput) and out.completion_tokens == DEFAULT_MAX_TOKENS


def test_output_stops_at_the_end_of_the_context(engine: Engine) -> None:
    words = " ".join(["word"] * (MAX_MODEL_LEN // 2))
    (out,) = _outputs(engine, _ask("room", words, max_tokens=MAX_MODEL_LEN))
    assert isinstance(out, EngineOutput)
    assert out.prompt_tokens + out.completion_tokens == MAX_MODEL_LEN


def test_a_bad_request_fails_alone(engine: Engine) -> None:
    too_long = " ".join(["word"] * (MAX_MODEL_LEN * 2))
    outs = _outputs(engine, _ask("long", too_long, max_tokens=2), _ask("empty", "", max_tokens=2),
                    _ask("fine", "a fine prompt", max_tokens=2))
    assert isinstance(outs[0], PromptTooLong) and str(outs[0]).startswith("prompt: ")
    assert isinstance(outs[1], InvalidRequest) and str(outs[1]).startswith("prompt: ")
    assert isinstance(outs[2], EngineOutput) and outs[2].completion_tokens == 2


def test_stats_count_what_was_served(engine: Engine) -> None:
    before = engine.stats().requests_served
    _outputs(engine, *(_ask(f"s{i}", f"prompt {i}", max_tokens=2) for i in range(5)))
    assert engine.stats().requests_served == before + 5
    assert engine.ping(5.0) is True


def test_a_closed_engine_fails_requests_with_engine_failed(engine: Engine) -> None:
    engine.close()  # the module's last use of this engine
    (out,) = _outputs(engine, _ask("late", "too late", max_tokens=2))
    assert isinstance(out, EngineFailed)
