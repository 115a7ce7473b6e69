"""Worker-side bodies of the fleet's tasks, registered under the producer's task names."""

from __future__ import annotations

from typing import Any

from producer.schema import ChatRequest, GenerateRequest
from producer.tasks import ChatTask, GenerateTask
from workers import runtime


class ServeGenerate(GenerateTask):
    """Runs ``fleet.generate`` on this worker's engine."""

    def run(self, **kwargs: Any) -> dict[str, Any]:
        return runtime.current().handle(GenerateRequest, self.request.id, kwargs)


class ServeChat(ChatTask):
    """Runs ``fleet.chat`` on this worker's engine."""

    def run(self, **kwargs: Any) -> dict[str, Any]:
        return runtime.current().handle(ChatRequest, self.request.id, kwargs)
