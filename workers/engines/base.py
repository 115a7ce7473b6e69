"""The engine plug point: what a worker needs from whatever generates the text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from producer.schema import PRIORITY_LEVELS
from workers.toolcalls import Call


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request as an engine sees it: validated, with the model's defaults applied."""

    request_id: str
    sampling: dict[str, Any]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # for the chat template (OpenAI's shape)
    #: Called on the engine's thread with each new piece of the text while it is generated
    #: (a streaming request); it must return at once.
    on_text: Callable[[str], None] | None = None
    #: Lower is sooner (``producer.schema.PRIORITY_LEVELS``): the engine schedules waiting
    #: requests in this order.
    priority: int = PRIORITY_LEVELS["default"]
    #: OpenAI's fields for the form of the reply as the request gave them (``tool_choice``,
    #: ``parallel_tool_calls``, ``response_format``): what an OpenAI-compatible server is sent
    #: in place of the structured-output constraint in ``sampling``, which the engine in the
    #: worker applies itself.
    api_fields: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """What an engine returns for one finished request."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None  # when the request asked for them
    #: The tool calls an OpenAI-compatible server's own parser found in the text (None: the
    #: fleet reads the text itself, workers/replies.py).
    tool_calls: list[Call] | None = None


@dataclass(slots=True)
class EngineStats:
    """Counters an engine keeps about itself."""

    running: int = 0  # requests the engine is generating for now
    waiting: int = 0  # requests inside the engine waiting for a place in its running batch
    kv_cache_usage: float = 0.0  # share of the KV cache in use (0 where the engine has none)
    max_running: int = 0
    requests_served: int = 0
    tokens_generated: int = 0
    #: Requests inside the engine by priority: {priority: [running, waiting]}.
    by_priority: dict[int, list[int]] = field(default_factory=dict)


class Engine(Protocol):
    """A resident engine. Batch first: a single request is a batch of one."""

    def start(self) -> None:
        """Load the engine; return when it can serve, raise if it cannot."""

    def submit(self, requests: Sequence[EngineRequest]) -> list[Future[EngineOutput]]:
        """Hand requests to the engine; each future ends with its output or its own error."""

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop generating for these requests; their futures end with finish_reason abort."""

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""

    def ping(self, timeout: float) -> bool:
        """True if the engine itself answers within ``timeout`` seconds (alive, not hung)."""

    def close(self) -> None:
        """Finish what runs, free the engine's memory and processes."""

    def sleep(self) -> None:
        """Idle with nothing in flight: free the device memory but keep what makes waking
        quick (vLLM's sleep mode); raise if this engine cannot sleep."""

    def wake_up(self) -> None:
        """Back from :meth:`sleep`, able to serve."""
