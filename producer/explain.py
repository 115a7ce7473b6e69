"""How a validation error reads: one ``field: what (got ...)`` segment per bad field.

An unknown field gets a hint at the field meant, when there is an obvious one. All of it runs
only once validation has failed, so a valid call pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

#: How pydantic opens the message of a ValueError raised by a validator; the rest says it all.
VALUE_ERROR = "Value error, "
#: What other tools call a field of the fleet (Hugging Face, OpenAI, llama.cpp, Ollama, vLLM).
#: Refused all the same: a name is accepted in one spelling only.
RENAMED = {
    "max_new_tokens": "max_tokens",
    "max_length": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "num_predict": "max_tokens",
    "n_predict": "max_tokens",
    "do_sample": "temperature",
    "stop_sequences": "stop",
    "stop_strings": "stop",
    "repeat_penalty": "repetition_penalty",
    "random_seed": "seed",
    "top_logprobs": "logprobs",
    "guided_json": "response_format",
}
#: What to know beside the fleet's name, where the meaning differs.
NOTES = {
    "max_length": "which counts generated tokens only",
    "do_sample": "0 decodes greedily",
}
_ONE_COMPLETION = "one completion per request: send it n times, with different seeds"
#: Sampling features other tools have and the fleet does not.
NOT_SUPPORTED = {
    "num_beams": "beam search is not supported",
    "use_beam_search": "beam search is not supported",
    "n": _ONE_COMPLETION,
    "best_of": _ONE_COMPLETION,
    "num_return_sequences": _ONE_COMPLETION,
    "stream": "results are not streamed",
}


def describe(schema: type[BaseModel], error: ValidationError) -> str:
    """One segment per bad field, e.g. ``invalid GenerateRequest: temperature: ... (got -1)``."""
    errors = error.errors(include_url=False)
    return f"invalid {schema.__name__}: " + "; ".join(segment(schema, e) for e in errors)


def segment(schema: type[BaseModel], error: ErrorDetails) -> str:
    """``field: what (got ...)`` for one error of validating ``schema``."""
    loc = error["loc"]
    # The key of a dict is bad, not its value (an unknown field may be named "[key]" itself).
    if loc and loc[-1] == "[key]" and error["type"] != "extra_forbidden":
        loc = loc[:-1]
    field = ".".join(str(part) for part in loc) or "(request)"
    what = error["msg"].removeprefix(VALUE_ERROR)
    if error["type"] == "extra_forbidden" and loc:
        what = unknown_field(loc[-1], fields_at(schema, loc[:-1]))
    got = repr(error.get("input"))
    if len(got) > 80:
        got = got[:77] + "..."
    return f"{field}: {what} (got {got})"


def unknown_field(key: Any, known: Collection[str]) -> str:
    """What to say of an unknown field ``key`` where the fields ``known`` are allowed."""
    target = RENAMED.get(key)
    if target in known:
        note = NOTES.get(key)
        return f"unknown field, use {target}" + (f", {note}" if note else "")
    if key in NOT_SUPPORTED and "temperature" in known:  # among the sampling knobs
        return f"unknown field, {NOT_SUPPORTED[key]}"
    import difflib  # here: only a refused call pays for importing it

    close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
    return f"unknown field, did you mean {close[0]}?" if close else "unknown field"


def fields_at(schema: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The field names allowed at ``path`` inside ``schema``: those of the model found there
    (several, if a union leaves it open); none if no model is there."""
    types: list[Any] = [schema]
    for part in path:
        types = [inner for outer in types for inner in _step(outer, part)]
    models = [member for found in types for member in _members(found) if _is_model(member)]
    names = {field.alias or name for model in models for name, field in model.model_fields.items()}
    return sorted(names)


def _step(annotation: Any, part: int | str) -> Iterator[Any]:
    """The types found one ``part`` (a field, an index, a key) inside ``annotation``."""
    for member in _members(annotation):
        if _is_model(member):
            for name, field in member.model_fields.items():
                if part in (name, field.alias):
                    yield field.annotation
        elif get_origin(member) is list and isinstance(part, int):
            yield get_args(member)[0]
        elif get_origin(member) is dict:
            yield get_args(member)[1]


def _members(annotation: Any) -> list[Any]:
    """``annotation`` without its Annotated metadata, one entry per member of a union."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
