"""OpenAI's HTTP shapes and the fleet's: request bodies in, responses and stream chunks out.

Pure functions, no I/O. A body becomes the keyword arguments of a fleet task (the same names
wherever OpenAI and vLLM use the fleet's, which is nearly everywhere); a field that would change
the output and that the fleet cannot honour is refused naming it, and an unknown one is ignored
and reported, as vLLM's server does. Responses carry the keys vLLM's server writes (its extras
as null), so a client written against vLLM finds every key it reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import TaskRevokedError

from producer import errors
from producer.errors import InvalidRequest
from producer.schema import SAMPLING_FIELDS, Completion, TokenLogprob

#: Fields that leave the output alone: accepted, not passed on.
ACCEPTED = frozenset({"model", "stream", "stream_options", "user", "metadata", "store",
                      "service_tier", "prompt_cache_key", "safety_identifier", "request_id"})
#: Fields the fleet passes on under the same name.
CHAT_FIELDS = SAMPLING_FIELDS - {"logprobs"} | {"response_format", "tools", "tool_choice",
                                                 "parallel_tool_calls"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"response_format"}


def _not_one(value: Any) -> bool:
    return value not in (None, 1)


#: Fields that change the output in a way the fleet does not offer: refused when set.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_not_one, "one choice per request: send the request n times, with different seeds"),
    "best_of": (_not_one, "one choice per request: best_of is not supported"),
    "use_beam_search": (bool, "beam search is not supported"),
    "echo": (bool, "echo is not supported: the prompt is not repeated in the output"),
    "suffix": (lambda v: v is not None, "suffix (insertion) is not supported"),
    "prompt_logprobs": (lambda v: v is not None, "prompt logprobs are not supported"),
    "continue_final_message": (bool, "continue_final_message is not supported"),
    "add_generation_prompt": (lambda v: v is False, "the reply always opens with the "
                              "assistant's turn (add_generation_prompt false is not supported)"),
    "return_tokens_as_token_ids": (bool, "tokens are returned as text"),
    "chat_template": (lambda v: v is not None, "a per-request chat template is not supported "
                      "(set chat_template in the model's fleet config)"),
    "chat_template_kwargs": (bool, "chat_template_kwargs are not supported"),
    "functions": (lambda v: v is not None, "use tools (functions is OpenAI's older form)"),
    "function_call": (lambda v: v is not None, "use tool_choice (function_call is OpenAI's "
                      "older form)"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), "only text output is supported"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported"),
}

#: vLLM clamps log-probabilities that are not finite to this (JSON has no infinity).
MIN_LOGPROB = -9999.0


class ApiError(Exception):
    """An answer in OpenAI's error shape, with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "invalid_request_error", 409: "invalid_request_error",
             413: "invalid_request_error",
             503: "service_unavailable_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Call:
    """A request body read for the fleet."""

    model: str
    """The model as the caller named it (an id or an alias); responses repeat it."""
    kwargs: dict[str, Any]
    """The fleet task's keyword arguments, less ``model`` and ``stream``."""
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    """Chat: how many alternatives each token's logprobs list (None: no logprobs)."""
    prompts: list[str] = field(default_factory=list)
    """Completions: the prompts, one choice each."""
    ignored: list[str] = field(default_factory=list)
    """Unknown fields, left out (the gateway logs them)."""
    renamed: dict[str, str] = field(default_factory=dict)
    """Fleet field -> the body's name for it, to name the caller's field in an error."""

    @property
    def streams_text(self) -> bool:
        """Whether the worker streams the text (not with tools or logprobs: they come whole)."""
        chat_tools = self.kwargs.get("tools") and self.kwargs.get("tool_choice") != "none"
        return self.stream and not chat_tools and "logprobs" not in self.kwargs


def chat_call(body: dict[str, Any]) -> Call:
    """A ``/v1/chat/completions`` body as a fleet chat call; ApiError 400 naming the field."""
    call = _common(body, CHAT_FIELDS | {"messages", "logprobs", "top_logprobs"})
    call.kwargs.update(_pass_on(body, CHAT_FIELDS))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages: a list of messages is required", param="messages")
    call.kwargs["messages"] = [_message(m, i) for i, m in enumerate(messages)]
    top = body.get("top_logprobs")
    if body.get("logprobs"):
        call.top_logprobs = top if isinstance(top, int) else 0
        call.kwargs["logprobs"] = call.top_logprobs
        call.renamed["logprobs"] = "top_logprobs"
    elif top is not None:
        raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    return call


def completion_call(body: dict[str, Any]) -> Call:
    """A ``/v1/completions`` body as fleet generate calls, one per prompt."""
    call = _common(body, COMPLETION_FIELDS | {"prompt"})
    call.kwargs.update(_pass_on(body, COMPLETION_FIELDS))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        call.prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        call.prompts = list(prompt)
    else:
        raise ApiError(400, "prompt: a string or a non-empty list of strings is required (token "
                            "ids are not accepted)", param="prompt")
    return call


def _common(body: dict[str, Any], known: frozenset[str] | set[str]) -> Call:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: the model's name is required", param="model")
    for name, (refuse, why) in REFUSED.items():
        if name in body and refuse(body[name]):
            raise ApiError(400, f"{name}: {why}", param=name)
    options = body.get("stream_options")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise ApiError(400, "stream: must be true or false", param="stream")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options: must be an object", param="stream_options")
    call = Call(model=model, kwargs={}, stream=bool(stream),
                include_usage=bool((options or {}).get("include_usage")))
    call.ignored = sorted(k for k in body if k not in known and k not in ACCEPTED
                          and k not in REFUSED and k not in ("max_completion_tokens", "priority"))
    tokens = body.get("max_completion_tokens")
    if tokens is None:
        tokens = body.get("max_tokens")
    else:
        call.renamed["max_tokens"] = "max_completion_tokens"
    if tokens is not None:
        call.kwargs["max_tokens"] = tokens
    if body.get("priority") is not None:  # vLLM's extra field: lower is sooner
        call.kwargs["priority"] = body["priority"]
    return call


def _pass_on(body: dict[str, Any], names: frozenset[str] | set[str]) -> dict[str, Any]:
    """The fields the fleet takes under their own names; null is the same as absent."""
    return {k: v for k, v in body.items()
            if k in names and v is not None and k != "max_tokens"}


def _message(message: Any, index: int) -> dict[str, Any]:
    """One message in the fleet's shape: text parts joined, ``developer`` as ``system``."""
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where}: a message is an object", param=where)
    out = {k: v for k, v in message.items()
           if k in ("role", "content", "tool_calls", "tool_call_id") and v is not None}
    if out.get("role") == "developer":
        out["role"] = "system"
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}.content.{j}: only text parts are supported",
                               param=f"{where}.content")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    if "content" not in out and not out.get("tool_calls"):
        out["content"] = None  # the fleet's validation names it
    return out


def invalid(error: InvalidRequest, call: Call) -> ApiError:
    """A fleet validation error as a 400 whose ``param`` names the caller's field."""
    message = re.sub(r"^invalid \w+: ", "", str(error))
    path = message.split(":", 1)[0] if ":" in message else None
    if path is not None and not re.fullmatch(r"[\w.\[\]-]+", path):
        path = None
    if path is not None:
        head, _, rest = path.partition(".")
        if head in call.renamed:
            renamed = call.renamed[head] + ("." + rest if rest else "")
            message = renamed + message[len(path):]
            path = renamed
    return ApiError(400, message, param=path)


#: Seconds a client is told to wait (Retry-After) when no engine of its model is live.
RETRY_AFTER_S = 5


def status_of(error: BaseException) -> int:
    """The HTTP status of a fleet error: what an OpenAI client does next."""
    if isinstance(error, errors.UnknownModel):
        return 404
    if isinstance(error, errors.RequestTooLarge):
        return 413
    if isinstance(error, errors.DeadLettered):
        return 500
    if isinstance(error, errors.RequestRejected):
        return 400
    if isinstance(error, errors.FleetUnavailable | TaskRevokedError):
        return 503
    return 500


def api_error(error: BaseException, call: Call | None = None) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, errors.InvalidRequest) and call is not None:
        return invalid(error, call)
    status = status_of(error)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    code = type(error).__name__ if isinstance(error, errors.FleetError) else None
    return ApiError(status, str(error) or type(error).__name__, code=code, headers=headers)


# --- responses --------------------------------------------------------------------------------

#: What responses name as their system (vLLM's server: ``vllm-<version>-<hash>``).
FINGERPRINT = "vllm-fleet"
VLLM_NULLS = {"service_tier": None, "system_fingerprint": FINGERPRINT}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def chat_response(c: Completion, *, response_id: str, created: int, model: str,
                  top_logprobs: int | None) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "message": chat_message(c),
            "logprobs": chat_logprobs(c.logprobs, top_logprobs),
            "finish_reason": c.finish_reason, "stop_reason": None, "token_ids": None,
            "routed_experts": None,
        }],
        **VLLM_NULLS,
        "usage": usage(c.prompt_tokens, c.completion_tokens),
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


def chat_message(c: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None,
                               "annotations": None, "audio": None, "function_call": None}
    if c.tool_calls:
        message["tool_calls"] = [call.model_dump() for call in c.tool_calls]
    message["reasoning"] = None
    return message


def chat_logprobs(tokens: list[TokenLogprob] | None, top: int | None) -> dict[str, Any] | None:
    """OpenAI's chat logprobs: per token, its logprob, bytes and ``top`` alternatives."""
    if tokens is None or top is None:
        return None
    return {"content": [
        {"token": t.token, "logprob": _finite(t.logprob), "bytes": list(t.token.encode()),
         "top_logprobs": [{"token": a.token, "logprob": _finite(a.logprob),
                           "bytes": list(a.token.encode())} for a in t.top_logprobs[:top]]}
        for t in tokens]}


def completion_response(choices: list[Completion], *, response_id: str, created: int,
                        model: str) -> dict[str, Any]:
    """A ``text_completion`` object, one choice per prompt."""
    return {
        "id": response_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": i, "text": c.text, "logprobs": completion_logprobs(c.logprobs),
            "finish_reason": c.finish_reason, "stop_reason": None, "token_ids": None,
            "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None,
        } for i, c in enumerate(choices)],
        **VLLM_NULLS,
        "usage": usage(sum(c.prompt_tokens for c in choices),
                       sum(c.completion_tokens for c in choices)),
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


def completion_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """The legacy completions logprobs: tokens, their logprobs, offsets, alternatives."""
    if tokens is None:
        return None
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"text_offset": offsets,
            "token_logprobs": [_finite(t.logprob) for t in tokens],
            "tokens": [t.token for t in tokens],
            "top_logprobs": [{a.token: _finite(a.logprob) for a in t.top_logprobs}
                             for t in tokens]}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


# --- stream chunks ----------------------------------------------------------------------------

def chat_chunk(head: dict[str, Any], delta: dict[str, Any], *,
               finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice; ``head``: id, object, created, model."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = None
    return {**head, "choices": [choice]}


def completion_chunk(head: dict[str, Any], index: int, text: str, *,
                     finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    chunk = {**head, "choices": [{
        "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
        "stop_reason": None, "prompt_token_ids": None, "token_ids": None}]}
    if finish_reason is not None:
        chunk["system_fingerprint"] = FINGERPRINT
    return chunk


def usage_chunk(head: dict[str, Any], prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {**head, "choices": [], "usage": {
        "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens}, "system_fingerprint": FINGERPRINT}


def tool_call_deltas(c: Completion) -> list[dict[str, Any]]:
    """A reply's tool calls as one chunk's deltas: each call whole, with its index."""
    return [{"id": call.id, "type": "function", "index": i,
             "function": {"name": call.function.name, "arguments": call.function.arguments}}
            for i, call in enumerate(c.tool_calls or ())]
