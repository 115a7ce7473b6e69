"""Errors of the fleet, split by what the caller does next.

    FleetError
    ├── RequestRejected        fix the request; retrying it unchanged fails the same way
    │   ├── InvalidRequest     a parameter is out of range, of the wrong type or unknown
    │   ├── PromptTooLong      the prompt does not fit the model's context
    │   ├── UnknownModel       no such model in the fleet configuration
    │   ├── RequestTooLarge    the task message is above the size limit
    │   └── DeadLettered       the task killed or lost its worker max_deliveries times
    ├── FleetUnavailable       try again later; the request itself is fine
    │   ├── NoEngine           no engine serves the model right now
    │   ├── EngineFailed       the engine failed while serving the request
    │   │   └── EngineUnreachable  a remote engine's server did not answer (the worker puts
    │   │                      the task back in its queue; seen only if it cannot)
    │   └── StreamBroken       a streamed text was cut off (its worker was lost); send again
    └── ConfigError            fix the settings: the file or variable the message names

Every class takes one message argument, so Celery can rebuild it from a JSON result.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error raised by vllm-fleet."""


class RequestRejected(FleetError, ValueError):
    """The request can never succeed as it is."""


class InvalidRequest(RequestRejected):
    """A request parameter is invalid; the message names the field."""


class PromptTooLong(RequestRejected):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


class UnknownModel(RequestRejected):
    """The model id is not in the fleet configuration."""


class RequestTooLarge(RequestRejected):
    """The request's message is larger than ``max_message_bytes``."""


class DeadLettered(RequestRejected):
    """The task was delivered ``max_deliveries`` times without finishing; it will not run."""


class FleetUnavailable(FleetError):
    """The fleet cannot serve the request now; retrying later may succeed."""


class NoEngine(FleetUnavailable):
    """No live engine serves the requested model."""


class EngineFailed(FleetUnavailable):
    """The engine failed while serving the request."""


class EngineUnreachable(EngineFailed):
    """The server of a remote engine (``engine = "openai"``) could not be reached, or refused
    the worker's key: the task goes back to its queue for another engine."""


class StreamBroken(FleetUnavailable):
    """A streamed text was cut off before its end (its worker was lost, or its entries expired);
    the text is never restarted or spliced, so the request must be sent again."""


class ConfigError(FleetError):
    """The settings (FLEET_ variables, the FLEET_CONFIG file) are invalid; the message names
    where and which key."""
