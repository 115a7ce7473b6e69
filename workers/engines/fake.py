"""A deterministic stand-in engine with zero generation cost.

For unit tests and for measuring pure queue overhead only: it never stands in for the real
engine in a test that claims the fleet works. Its "text" is the prompt's words echoed back,
so results are checkable; one word is one token.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

from producer.errors import EngineFailed, InvalidRequest, PromptTooLong
from producer.schema import DEFAULT_MAX_TOKENS
from workers.engines.base import EngineOutput, EngineRequest, EngineStats


class FakeEngine:
    """Answers every request at once, echoing its prompt."""

    def __init__(self, max_model_len: int = 4096) -> None:
        self.max_model_len = max_model_len
        self._stats = EngineStats()
        self._lock = threading.Lock()
        self.asleep = False
        self.closed = False

    def start(self) -> None:
        pass

    def submit(self, requests: Sequence[EngineRequest]) -> list[Future[EngineOutput]]:
        if self.asleep:  # as vLLM would fail them: a runtime must wake the engine first
            raise RuntimeError("the engine is asleep")
        futures = []
        for request in requests:
            future: Future[EngineOutput] = Future()
            try:
                future.set_result(self._answer(request))
            except Exception as e:  # this request's own error, as the vLLM engine fails it
                future.set_exception(e)
            futures.append(future)
        tokens = sum(f.result().completion_tokens for f in futures if f.exception() is None)
        with self._lock:
            self._stats.max_running = max(self._stats.max_running, len(requests))
            self._stats.requests_served += len(requests)
            self._stats.tokens_generated += tokens
        return futures

    def _answer(self, request: EngineRequest) -> EngineOutput:
        # The vLLM engine's rules (tests/test_engine_contract.py holds both to them).
        if self.closed:
            raise EngineFailed("engine unavailable: engine is closing")
        if request.messages is not None:
            words = " ".join(m["content"] or "" for m in request.messages).split()
        else:
            words = (request.prompt or "").split()
            if not words:
                raise InvalidRequest("prompt: empty after tokenization")
        if len(words) >= self.max_model_len:
            raise PromptTooLong(f"prompt: {len(words)} tokens, but the model takes at most "
                                f"{self.max_model_len - 1} prompt tokens")
        max_tokens = min(int(request.sampling.get("max_tokens") or DEFAULT_MAX_TOKENS),
                         self.max_model_len - len(words))
        out = (words or ["empty"]) * (max_tokens // max(len(words), 1) + 1)
        text = " ".join(out[:max_tokens])
        if request.on_text is not None:  # a streaming request: one delta a word, as tokens come
            for i, word in enumerate(out[:max_tokens]):
                request.on_text(word if i == 0 else " " + word)
        return EngineOutput(text, "length", len(words), max_tokens)

    def abort(self, request_ids: Sequence[str]) -> None:
        pass

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(**{k: getattr(self._stats, k) for k in EngineStats.__slots__})

    def ping(self, timeout: float) -> bool:
        return True

    def sleep(self) -> None:
        self.asleep = True

    def wake_up(self) -> None:
        self.asleep = False

    def close(self) -> None:
        self.closed = True
