"""vllm-fleet, application side: enqueue generation and chat tasks on the fleet.

    from producer import Fleet, chat, generate
    generate.delay("Write a haiku", model="tiny", max_tokens=64).get()

    with Fleet(model="tiny") as llm:        # one model, blocking calls, defaults
        llm.generate("Write a haiku", max_tokens=64).text

Imports neither vLLM nor torch.
"""

from producer.celery_app import app
from producer.errors import (
    ConfigError,
    DeadLettered,
    EngineFailed,
    FleetError,
    FleetUnavailable,
    InvalidRequest,
    NoEngine,
    PromptTooLong,
    RequestRejected,
    RequestTooLarge,
    StreamBroken,
    UnknownModel,
)
from producer.fleet import Fleet
from producer.schema import ChatMessage, ChatRequest, Completion, GenerateRequest, Sampling
from producer.tasks import chat, chat_many, engine_status, generate, generate_many, warmup

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "ConfigError",
    "DeadLettered",
    "EngineFailed",
    "Fleet",
    "FleetError",
    "FleetUnavailable",
    "GenerateRequest",
    "InvalidRequest",
    "NoEngine",
    "PromptTooLong",
    "RequestRejected",
    "RequestTooLarge",
    "Sampling",
    "StreamBroken",
    "UnknownModel",
    "app",
    "chat",
    "chat_many",
    "engine_status",
    "generate",
    "generate_many",
    "warmup",
]
