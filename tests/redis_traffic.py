"""What this process sends to Redis: round trips counted, messages published recorded.

Recorded at the client, not read back from the server: the session's Redis is shared with the
workers other tests start, whose own traffic would blur a server-side count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.connection
from kombu.messaging import Producer

#: Sent when a connection opens or is checked, not by the code under test.
CONNECTION_SETUP = frozenset({"AUTH", "HELLO", "CLIENT", "SELECT", "PING"})


@contextmanager
def round_trips(skip: frozenset[str] = frozenset()) -> Iterator[list[list[str]]]:
    """The command names of every round trip to Redis inside the block, one list per trip (a
    pipeline is one trip), from every connection of this process; single commands in ``skip``
    are left out."""
    trips: list[list[str]] = []
    cls = redis.connection.AbstractConnection
    send_command, pack_commands = cls.send_command, cls.pack_commands

    def counting_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        if str(args[0]) not in skip:
            trips.append([str(args[0])])
        return send_command(self, *args, **kwargs)

    def counting_pack(self: Any, commands: Any) -> Any:
        commands = list(commands)
        trips.append([str(command[0]) for command in commands])
        return pack_commands(self, commands)

    cls.send_command, cls.pack_commands = counting_send, counting_pack  # type: ignore[method-assign]
    try:
        yield trips
    finally:
        cls.send_command, cls.pack_commands = send_command, pack_commands  # type: ignore[method-assign]


@contextmanager
def published() -> Iterator[list[str]]:
    """The routing key of every message published through kombu inside the block."""
    keys: list[str] = []
    publish = Producer.publish

    def recording(self: Any, body: Any, routing_key: Any = None, *args: Any,
                  **kwargs: Any) -> Any:
        keys.append(str(routing_key))
        return publish(self, body, routing_key, *args, **kwargs)

    Producer.publish = recording  # type: ignore[method-assign]
    try:
        yield keys
    finally:
        Producer.publish = publish  # type: ignore[method-assign]


@contextmanager
def nothing_sent() -> Iterator[None]:
    """Fail unless the block publishes no message and sends Redis nothing at all."""
    with published() as keys, round_trips() as trips:
        yield
    assert keys == [], f"published to {keys}"
    assert trips == [], f"sent Redis {trips}"
