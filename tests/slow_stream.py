"""Test-only: the fake engine streaming slowly, so that a test can lose a worker mid-stream.

Loaded into a worker by the tests only (``celery worker --include tests.slow_stream``). A
streaming request's words come one every ``WORD_S`` seconds from a thread of their own, then
its output; other requests are answered at once, as the fake engine does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace

from workers.engines.base import EngineOutput, EngineRequest
from workers.engines.fake import FakeEngine

WORD_S = 0.1

_submit = FakeEngine.submit


def _slow_submit(self: FakeEngine, requests: Sequence[EngineRequest]) -> list[Future[EngineOutput]]:
    futures: list[Future[EngineOutput]] = []
    for request in requests:
        if request.on_text is None:
            futures.extend(_submit(self, [request]))
            continue
        future: Future[EngineOutput] = Future()
        futures.append(future)
        done = _submit(self, [replace(request, on_text=None)])[0]

        def stream(request: EngineRequest = request, done: Future[EngineOutput] = done,
                   future: Future[EngineOutput] = future) -> None:
            if done.exception() is not None:
                future.set_exception(done.exception())  # type: ignore[arg-type]
                return
            out = done.result()
            for i, word in enumerate(out.text.split(" ")):
                time.sleep(WORD_S)
                assert request.on_text is not None
                request.on_text(word if i == 0 else " " + word)
            future.set_result(out)

        threading.Thread(target=stream, daemon=True).start()
    return futures


FakeEngine.submit = _slow_submit  # type: ignore[method-assign]
