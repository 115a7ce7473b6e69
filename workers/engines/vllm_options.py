"""What the vLLM engine adds to a request and to its engine arguments beyond the basic knobs.

Hooks of :mod:`workers.engines.vllm`: the per-model engine options of the fleet config, the
chat template (the model's own or the configured override, with tools), the allow-listed
per-call sampling extras with the structured-output constraint, and logprobs in the result.
"""

from __future__ import annotations

import json
from typing import Any

from producer.schema import SAMPLING_FIELDS
from producer.settings import ModelConfig
from workers.engines.base import EngineRequest


def engine_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Further ``vllm.EngineArgs`` of a model; checks its tool parser and chat template first."""
    from vllm.config import StructuredOutputsConfig

    if config.tool_call_parser:
        from workers.toolcalls import check_parser

        check_parser(config.tool_call_parser)
    chat_template(config)  # a missing template file fails the load, not the first chat
    options = config.structured_outputs_config.model_dump()
    return {"structured_outputs_config": StructuredOutputsConfig(**options)}


def chat_template(config: ModelConfig) -> str | None:
    """The configured override (inline Jinja, or a file), or None for the model's own."""
    if config.chat_template is None:
        return None
    from vllm.renderers.chat_utils import load_chat_template

    return load_chat_template(config.chat_template)


def render_chat(tokenizer: Any, request: EngineRequest, config: ModelConfig) -> str:
    """The prompt text of a chat request: messages and tools through the chat template."""
    return str(tokenizer.apply_chat_template(
        template_messages(request.messages or []),
        tools=request.tools,
        chat_template=chat_template(config),
        add_generation_prompt=True,
        tokenize=False,
    ))


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments as objects, not JSON text
    (the Transformers convention; vLLM's chat renderer does the same)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{**call, "function": {**call["function"],
                                           "arguments": json.loads(call["function"]["arguments"])}}
                     for call in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def sampling_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments: every sampling field a request set (the
    wire names them as vLLM does), logit_bias keyed by token id, and its JSON constraint."""
    kwargs = {k: sampling[k] for k in SAMPLING_FIELDS if sampling.get(k) is not None}
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = {int(k): v for k, v in kwargs["logit_bias"].items()}
    constraint = sampling.get("structured_outputs")
    if constraint is not None:
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(**constraint)
    return kwargs


def token_logprobs(completion: Any) -> list[dict[str, Any]] | None:
    """Each generated token's logprob and the candidates vLLM returned for its position (the
    ``logprobs`` most likely, and the chosen token if it was not among them), JSON-ready."""
    if getattr(completion, "logprobs", None) is None:  # None unless the request asked
        return None
    tokens = []
    for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
        ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
        chosen = position.get(token_id)
        tokens.append({
            "token": (chosen.decoded_token if chosen else None) or "",
            "token_id": token_id,
            "logprob": chosen.logprob if chosen else float("-inf"),
            "top_logprobs": [{"token": lp.decoded_token or "", "token_id": tid,
                              "logprob": lp.logprob} for tid, lp in ranked],
        })
    return tokens
