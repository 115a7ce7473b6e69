"""Which fields an error message names, read the way the fleet writes them.

A message is ``[invalid <Schema>: ]<field>: <what> (got ...)[; <field>: ...]`` (see
``producer.explain.describe``); a batch item's error is its index's segment holding the item's
own error (``requests.3: invalid GenerateRequest: temperature: ...``), and a validator's
``<subfield>: ...`` (with or without pydantic's ``Value error, ``) names a field below its
segment's. A field is named when a segment's field is it, or lies below it (``messages.0.role``
names ``messages``). Field names may hold any text (unknown keyword arguments), so segments are
matched against the expected field rather than split blindly.
"""

from __future__ import annotations

import re

HEADER = re.compile(r"invalid [A-Za-z]+: ")
VALUE_ERROR = "Value error, "


def names_field(message: str, field: str) -> bool:
    """Whether ``message`` has a segment whose field is ``field`` or below it."""
    message = HEADER.sub("", message, count=1) if HEADER.match(message) else message
    starts = [0] + [m.end() for m in re.finditer("; ", message)]
    for start in starts:
        segment = message[start:]
        if segment.startswith((f"{field}: ", f"{field}.")):
            return True
        # The segment's own field may be a head of ``field``, its text naming the rest.
        parts = field.split(".")
        for cut in range(1, len(parts)):
            head, tail = ".".join(parts[:cut]), ".".join(parts[cut:])
            if segment.startswith(f"{head}: "):
                rest = segment[len(head) + 2:]
                rest = rest[len(VALUE_ERROR):] if rest.startswith(VALUE_ERROR) else rest
                if names_field(rest, tail):
                    return True
    return False


def assert_names_field(error: BaseException | str, field: str) -> None:
    """Fail unless the error's message names ``field`` as one of its own segments."""
    message = error if isinstance(error, str) else str(error)
    assert names_field(message, field), f"{field!r} is not a field named by: {message}"
