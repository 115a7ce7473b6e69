"""Client-side measures of an OpenAI-compatible server, the same for the fleet's gateway and for
vLLM's own server: time to first token, one stream's token rate, and how soon the fleet's engine
lets go of a request whose client left."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.systems.openai_server import CHAT_PATH, chat_body

#: Seconds between two looks at the engine: the resolution of the disconnect figure.
POLL_S = 0.02


@dataclass
class Streamed:
    """When one streamed chat answer was sent, and when its text arrived."""

    sent: float
    content_at: list[float] = field(default_factory=list)
    """``perf_counter()`` at each chunk carrying text (the role chunk's empty one is not)."""
    ended: float = 0.0
    """``perf_counter()`` once the stream ended or was dropped."""
    completion_tokens: int = 0
    """From the usage chunk: a chunk may carry several tokens."""

    @property
    def first_token_ms(self) -> float:
        return 1e3 * (self.content_at[0] - self.sent)

    @property
    def tokens_per_s(self) -> float:
        """The tokens after the first chunk's, over the time from the first chunk to the last
        (the first chunk is counted as one token: the gateway may carry more in it)."""
        return (self.completion_tokens - 1) / (self.content_at[-1] - self.content_at[0])


def first_token_ms(port: int, prompts: list[str], max_tokens: int = 32) -> list[float]:
    """Time to first token of each prompt, sent one at a time (an idle server)."""
    return [s.first_token_ms for s in _streams(port, prompts, max_tokens)]


def tokens_per_s(port: int, prompt: str, max_tokens: int = 256) -> float:
    """The rate at which one streamed answer's tokens arrive, alone on the server."""
    [streamed] = _streams(port, [prompt], max_tokens)
    if streamed.completion_tokens != max_tokens:
        raise AssertionError(f"{streamed.completion_tokens} tokens streamed, {max_tokens} asked")
    return streamed.tokens_per_s


def disconnect_ms(port: int, node: str, prompt: str, max_tokens: int = 400,
                  timeout: float = 30) -> dict[str, Any]:
    """Stream a long answer, drop the connection at its first text, and time how soon the
    worker ``node`` holds no request (``in_flight`` 0: what the fleet knows of its engine).

    ``aborted``: the engine did not finish the request (its served count did not move), so the
    time is the abort's, not the answer's. The time is taken when the worker's reply arrives:
    an upper bound, by one poll's round trip at most.
    """
    served = engine_load(node)["requests_served"]
    left = _streams(port, [prompt], max_tokens, leave_at_first=True)[0].ended
    while True:
        load = engine_load(node)
        elapsed = time.perf_counter() - left
        if load["in_flight"] == 0:
            return {"ms": 1e3 * elapsed, "aborted": load["requests_served"] == served}
        if elapsed > timeout:
            raise TimeoutError(f"{node} still holds the request {timeout:.0f}s after the "
                               f"client left: {load}")
        time.sleep(POLL_S)


def engine_load(node: str) -> dict[str, int]:
    """The worker's requests in flight and its engine's served count (``inspect engine``).

    ``producer.engines.list_engines`` waits out its whole timeout for workers it does not know
    of; one named worker with ``limit=1`` answers in milliseconds.
    """
    from producer.celery_app import app

    replies = app.control.broadcast("engine", destination=[node], reply=True, limit=1,
                                    timeout=2.0)
    if not replies:
        raise TimeoutError(f"{node} did not answer inspect engine")
    info = replies[0][node]
    return {"in_flight": info["in_flight"], "requests_served": info["requests_served"]}


def _streams(port: int, prompts: list[str], max_tokens: int, *,
             leave_at_first: bool = False) -> list[Streamed]:
    """Stream the prompts' answers one after another, on one client session."""
    import aiohttp

    async def run() -> list[Streamed]:
        async with aiohttp.ClientSession() as session:
            return [await _stream(session, port, p, max_tokens, leave_at_first=leave_at_first)
                    for p in prompts]

    return asyncio.run(run())


async def _stream(session: Any, port: int, prompt: str, max_tokens: int, *,
                  leave_at_first: bool = False) -> Streamed:
    body = {**chat_body(prompt, max_tokens), "stream": True,
            "stream_options": {"include_usage": True}}
    out = Streamed(time.perf_counter())
    async with session.post(f"http://127.0.0.1:{port}{CHAT_PATH}", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):  # blank separators and the closing [DONE]
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                out.content_at.append(time.perf_counter())
                if leave_at_first:
                    response.close()  # closes the connection: the server sees the client leave
                    break
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
        out.ended = time.perf_counter()
    if not out.content_at:
        raise RuntimeError("the stream carried no text")
    return out
