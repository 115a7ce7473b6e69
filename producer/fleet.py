"""One model of the fleet as an object for scripts, with defaults applied to every call.

    from producer import Fleet, Sampling

    with Fleet(model="tiny", params=Sampling(temperature=0)) as llm:
        llm.warmup()
        llm.generate("Hi", max_tokens=8).text

Each method is a blocking helper of ``producer/client.py`` or an engine control of
``producer/engines.py`` with the model and the defaults filled in. A Fleet holds nothing but
those, so threads may share one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from producer import client
from producer.engines import list_engines, select_nodes
from producer.engines import shutdown as shutdown_nodes
from producer.errors import InvalidRequest
from producer.naming import check_model_id
from producer.schema import Completion, Scheduling, parse
from producer.streams import TextStream
from producer.tasks import warmup as warmup_task
from producer.tasks import with_params
from producer.top import SERVING

#: How long ``warmup()`` waits when neither the call nor the Fleet names a timeout.
WARMUP_TIMEOUT_S = 300.0


class Fleet:
    """A model's engines and the defaults of every call: ``params`` (a Sampling or a mapping of
    its fields), ``timeout`` (seconds a call may wait) and ``priority``. A call's own keywords
    win over its ``params=``, which win over the Fleet's."""

    def __init__(self, model: str, *, params: client.Params = None,
                 timeout: float | None = None, priority: int | str | None = None) -> None:
        try:
            self.model = check_model_id(model, what="model")
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"model: {e}") from None
        # Validated here, so a bad default fails where it is written, not at the first call.
        self.params = with_params(params, {})
        self.timeout = timeout
        self.priority = parse(Scheduling, {"priority": priority}).priority

    def __repr__(self) -> str:
        return f"Fleet(model={self.model!r})"

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Does nothing: a Fleet opens no connection of its own.

        Its calls use the process's Celery app, whose broker connection pool and per-thread
        result-backend connections every other caller in the process shares (kombu keeps one
        pool per broker URL). Closing that pool from here would make the next send anywhere in
        the process fail ("Acquire on closed pool"); the connections go when the process exits.
        """

    def is_ready(self, *, timeout: float = 1.0) -> bool:
        """Whether an engine of the model answers, within ``timeout``, that it is ready (or
        unloaded while idle: the next request reloads it)."""
        return any(e.get("state") in SERVING for e in list_engines(self.model, timeout=timeout))

    def warmup(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Wait until an engine of the model consumes its queue, then have one of them load (if
        it was unloaded while idle) and answer; its health report. NoEngine if no engine comes
        within ``timeout``."""
        limit = self._timeout(timeout)
        limit = WARMUP_TIMEOUT_S if limit is None else limit
        deadline = time.monotonic() + limit
        client.wait_for_engine(self.model, timeout=limit)
        report: dict[str, Any] = warmup_task.delay(self.model).get(
            timeout=max(deadline - time.monotonic(), 1.0))
        return report

    def engines(self, *, timeout: float = 1.0) -> list[dict[str, Any]]:
        """The model's live engines, as ``fleet engines`` lists them."""
        return list_engines(self.model, timeout=timeout)

    def shutdown(self, *, wait: float | None = 300.0) -> list[str]:
        """Warm-shut every live engine of the model (each finishes the tasks it took); the nodes
        still answering when ``wait`` ran out."""
        return shutdown_nodes(select_nodes([], model=self.model), wait=wait)

    def generate(self, prompt: str, *, params: client.Params = None,
                 timeout: float | None = None, **sampling: Any) -> Completion:
        """Complete one prompt and wait for the result."""
        return client.generate(prompt, model=self.model, timeout=self._timeout(timeout),
                               **self._one(params, sampling))

    def chat(self, messages: Sequence[dict[str, Any]], *, params: client.Params = None,
             timeout: float | None = None, **sampling: Any) -> Completion:
        """Answer one conversation and wait for the result."""
        return client.chat(messages, model=self.model, timeout=self._timeout(timeout),
                           **self._one(params, sampling))

    def stream_generate(self, prompt: str, *, params: client.Params = None,
                        timeout: float | None = None, **sampling: Any) -> TextStream:
        """Complete one prompt, following the text as it is generated."""
        return client.stream_generate(prompt, model=self.model, timeout=self._timeout(timeout),
                                      **self._one(params, sampling))

    def stream_chat(self, messages: Sequence[dict[str, Any]], *, params: client.Params = None,
                    timeout: float | None = None, **sampling: Any) -> TextStream:
        """Answer one conversation, following the reply as it is generated."""
        return client.stream_chat(messages, model=self.model, timeout=self._timeout(timeout),
                                  **self._one(params, sampling))

    def generate_batch(self, prompts: Iterable[str | dict[str, Any]], *,
                       params: client.Params = None, timeout: float | None = None,
                       priority: int | str | None = None, return_exceptions: bool = False,
                       progress: bool | None = None, chunk_size: int = client.DEFAULT_CHUNK,
                       **sampling: Any) -> list[Any]:
        """Complete many prompts, results in input order (``producer.client.generate_batch``)."""
        return client.generate_batch(
            prompts, model=self.model, timeout=self._timeout(timeout),
            priority=self._batch_priority(priority), return_exceptions=return_exceptions,
            progress=progress, chunk_size=chunk_size, **self._keywords(params, sampling))

    def chat_batch(self, conversations: Iterable[Sequence[dict[str, Any]] | dict[str, Any]], *,
                   params: client.Params = None, timeout: float | None = None,
                   priority: int | str | None = None, return_exceptions: bool = False,
                   progress: bool | None = None, chunk_size: int = client.DEFAULT_CHUNK,
                   **sampling: Any) -> list[Any]:
        """Answer many conversations, results in input order (``producer.client.chat_batch``)."""
        return client.chat_batch(
            conversations, model=self.model, timeout=self._timeout(timeout),
            priority=self._batch_priority(priority), return_exceptions=return_exceptions,
            progress=progress, chunk_size=chunk_size, **self._keywords(params, sampling))

    def _keywords(self, params: client.Params, sampling: dict[str, Any]) -> dict[str, Any]:
        """A call's sampling keywords over its ``params`` over the Fleet's."""
        if "model" in sampling:
            raise InvalidRequest(f"model: this Fleet serves {self.model!r}; make a Fleet for "
                                 f"{sampling['model']!r}")
        return {**self.params, **with_params(params, sampling)}

    def _one(self, params: client.Params, sampling: dict[str, Any]) -> dict[str, Any]:
        keywords = self._keywords(params, sampling)
        if self.priority is not None:
            keywords.setdefault("priority", self.priority)
        return keywords

    def _batch_priority(self, priority: int | str | None) -> int | str:
        # The batch helpers' own default (``batch``) stands unless the call or the Fleet names one.
        if priority is not None:
            return priority
        return "batch" if self.priority is None else self.priority

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout
