"""Tool calls out of a model's text: vLLM's own parser for the model first, then fallback forms.

The native parser is the one a model's fleet config names (``tool_call_parser``, vLLM's
``--tool-call-parser`` names, looked up in ``vllm.tool_parsers.ToolParserManager``). When it
finds nothing, three forms models often fall back to are tried, in this order: a
``<TOOL_OUTPUT>...</TOOL_OUTPUT>`` tag, a JSON code block, an inline ``{"name": ...,
"arguments": ...}`` object. A fallback call counts only if it names an offered tool and its
arguments satisfy that tool's JSON schema; the model's own format gets the benefit of the doubt
(as in vLLM) except that its name must be offered and its arguments a JSON object.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from producer.settings import ModelConfig

log = logging.getLogger(__name__)

TAG = re.compile(r"<TOOL_OUTPUT>(.*?)</TOOL_OUTPUT>", re.DOTALL)
CODE_BLOCK = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
Tools = Sequence[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call: the function's name and its arguments object."""

    name: str
    arguments: dict[str, Any]

    def to_openai(self, call_id: str) -> dict[str, Any]:
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": arguments}}


class ToolCallReader:
    """Reads the tool calls of one model's outputs."""

    def __init__(self, parser_name: str | None = None, tokenizer: Any = None) -> None:
        self.parser_name = parser_name
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # parsers share the tokenizer; parsing is short

    def read(self, text: str, tools: Tools) -> tuple[list[Call], str]:
        """The calls in ``text`` of the offered ``tools``, and the text left beside them."""
        if self.parser_name:
            calls, content = self.native(text, tools)
            if calls:
                return calls, content
        return fallback(text, tools)

    def native(self, text: str, tools: Tools) -> tuple[list[Call], str]:
        """What the model's own vLLM parser finds (names not offered are dropped)."""
        request = _vllm_request(tools, "auto")
        with self._lock:
            info = self._parser(request).extract_tool_calls(text, request)
        if not info.tools_called:
            return [], text
        offered = _by_name(tools)
        calls = []
        for call in info.tool_calls:
            arguments = _object(call.function.arguments)
            if call.function.name in offered and arguments is not None:
                calls.append(Call(call.function.name, arguments))
        return calls, (info.content or "").strip()

    def keeps_special_tokens(self, tools: Tools, tool_choice: Any) -> bool:
        """Whether the model's parser needs special tokens left in the text: its own vLLM
        ``adjust_request`` says so (hermes does: tool-call tags are special tokens in some
        models, and decoding would drop them)."""
        if not self.parser_name:
            return False
        request = _vllm_request(tools, tool_choice)
        with self._lock:
            adjusted = self._parser(request).adjust_request(request)
        return adjusted.skip_special_tokens is False

    def _parser(self, request: Any) -> Any:
        from vllm.tool_parsers import ToolParserManager

        parser_cls = ToolParserManager.get_tool_parser(self.parser_name or "")
        # Parsers keep state: a fresh one per use.
        return parser_cls(self.tokenizer(), list(request.tools or ()))

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError("no tokenizer for the tool parser")
        return self._tokenizer


def _vllm_request(tools: Tools, tool_choice: Any) -> Any:
    """The request object vLLM's parsers take (only its tools and tool_choice matter here)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"messages": [], "model": "fleet", "tools": list(tools), "tool_choice": tool_choice}
    )


@functools.cache
def _reader(parser_name: str | None, tokenizer: str | None, trust_remote_code: bool
            ) -> ToolCallReader:
    loaded = None
    if parser_name and tokenizer:
        from vllm.tokenizers import get_tokenizer

        # The engine's tokenizer lives on the engine thread; the reader has its own copy.
        loaded = get_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return ToolCallReader(parser_name, loaded)


def reader_for(config: ModelConfig) -> ToolCallReader:
    """The (cached) reader of a model's tool calls. An ``openai`` engine's server parses with its
    own parser: what it leaves as text is read with the fallback forms only."""
    parser = None if config.engine == "openai" else config.tool_call_parser
    return _reader(parser, config.tokenizer or config.model,
                   config.trust_remote_code)


def check_parser(name: str) -> None:
    """Raise ValueError unless vLLM knows the tool parser ``name``."""
    from vllm.tool_parsers import ToolParserManager

    try:
        ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(ToolParserManager.list_registered())
        raise ValueError(f"tool_call_parser: vLLM has no tool parser {name!r} (known: {known})"
                         ) from None


# --- fallback forms ------------------------------------------------------------------------------

def fallback(text: str, tools: Tools) -> tuple[list[Call], str]:
    """Offered tools' calls in a tag, a code block or inline JSON (the first form with any)."""
    offered = _by_name(tools)
    for spans in (_tagged(text, TAG), _tagged(text, CODE_BLOCK), _inline(text)):
        calls, used = [], []
        for start, end, value in spans:
            found = [c for c in _calls_in(value) if _valid(c, offered)]
            if found:
                calls.extend(found)
                used.append((start, end))
        if calls:
            return calls, _without(text, used)
    return [], text


def _tagged(text: str, pattern: re.Pattern[str]) -> Iterator[tuple[int, int, Any]]:
    for match in pattern.finditer(text):
        try:
            yield match.start(), match.end(), json.loads(match.group(1))
        except ValueError:
            continue


def _inline(text: str) -> Iterator[tuple[int, int, Any]]:
    """Every top-level JSON object or list in running text."""
    decoder = json.JSONDecoder()
    i = 0
    while (i := _next_open(text, i)) != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        yield i, end, value
        i = end


def _next_open(text: str, start: int) -> int:
    positions = [p for p in (text.find("{", start), text.find("[", start)) if p != -1]
    return min(positions, default=-1)


def _calls_in(value: Any) -> Iterator[Call]:
    """A call object, or a list of them: ``{"name": ..., "arguments": {...}}``."""
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        # Llama-style JSON calls say "parameters"; some models send the arguments as a string.
        arguments = _object(item.get("arguments", item.get("parameters")))
        if arguments is not None:
            yield Call(item["name"], arguments)


def _valid(call: Call, offered: dict[str, dict[str, Any]]) -> bool:
    if call.name not in offered:
        return False
    schema = offered[call.name].get("parameters") or {"type": "object"}
    try:
        return bool(_validator(json.dumps(schema, sort_keys=True)).is_valid(call.arguments))
    except Exception:  # e.g. a $ref that does not resolve: the call cannot be trusted
        return False


@functools.lru_cache(maxsize=1024)
def _validator(schema: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema))


def _object(arguments: Any) -> dict[str, Any] | None:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _by_name(tools: Tools) -> dict[str, dict[str, Any]]:
    return {tool["function"]["name"]: tool["function"] for tool in tools}


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    for start, end in reversed(spans):
        text = text[:start] + text[end:]
    return text.strip()
