"""A remote engine: an OpenAI-compatible server (``vllm serve`` on a GPU box, a sidecar, a
managed endpoint) that serves the model for this worker.

The worker imports neither vLLM nor torch for it. One asyncio loop on a thread of its own holds
the HTTP session (aiohttp, connections kept alive and reused) and every open request, so one
worker keeps up to ``max_in_flight`` requests open against the server and the server's own
continuous batching runs them together; requests beyond that wait here, the soonest priority
first.

A request becomes the server's own call: ``/completions`` for a prompt, ``/chat/completions``
for messages, with the sampling knobs and vLLM's extras by their names, the tools, tool choice
and response format as the caller gave them (the server applies its chat template, tool parser
and structured outputs), and ``stream`` for a streaming task. A revoked task's request is
cancelled: its connection closes, and vLLM's server aborts a request whose client went away.

Health: the server is asked for its models (``GET /models``, with the key) every
``health_interval_s``; the engine is reachable while the answer lists the model. Each change is
reported to ``on_reachable`` (the worker consumes its model queue only while reachable). A
request that could not reach the server fails with EngineUnreachable (its task goes back to the
queue) and marks the server unreachable at once; a 4xx answer fails only its own request, as
InvalidRequest with the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from producer.errors import EngineFailed, EngineUnreachable, InvalidRequest, PromptTooLong
from producer.settings import ModelConfig
from workers.engines.base import EngineOutput, EngineRequest, EngineStats
from workers.toolcalls import Call

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

#: Seconds one health check may take before the server counts as unreachable.
HEALTH_TIMEOUT_S = 10.0
#: Server finish reasons the fleet's result reads differently: a tool call is read as such by
#: the fleet (workers/replies.py), which sets ``tool_calls`` itself.
FINISH_REASONS = {"tool_calls": "stop", "function_call": "stop", None: "stop"}


#: Seconds before a request that met a 5xx is sent once more.
RETRY_AFTER_S = 1.0


class ServerError(EngineFailed):
    """The server answered 5xx: its own failure, or its shutdown under way."""


class OpenAIEngine:
    """The model's requests, sent to an OpenAI-compatible server."""

    def __init__(self, model_id: str, config: ModelConfig, *,
                 on_reachable: Callable[[bool, str], None] | None = None) -> None:
        assert config.base_url is not None  # the config's own check
        self.model_id = model_id
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.served_name = config.remote_model or model_id
        #: Called on the engine's loop thread each time the server becomes reachable or not,
        #: with the reason; it must return at once.
        self.on_reachable = on_reachable
        self.reachable = False
        self.reason = "not checked yet"
        #: The context length the server reports for the model (vLLM's /models), else 0.
        self.max_model_len = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}
        #: Requests open at the server, by id: the call, the request, and who waits for it
        #: (a redelivered copy of a request still open waits for the same answer).
        self._open: dict[str, tuple[asyncio.Task[None], EngineRequest,
                                    list[Future[EngineOutput]]]] = {}
        self._waiting: list[tuple[int, int, EngineRequest, Future[EngineOutput]]] = []
        self._order = itertools.count()
        self._stats = EngineStats()
        self._check_now: asyncio.Event | None = None
        self._closed = threading.Event()
        self._watcher: asyncio.Task[None] | None = None

    # --- the caller's side -------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop and check the server once (reachable or not, this returns: the
        worker waits for the server without consuming)."""
        name = self.config.api_key_env
        if name is not None:
            key = os.environ.get(name)
            if not key:
                raise EngineFailed(f"api_key_env: the variable {name} that holds the key of "
                                   f"{self.base_url} is not set")
            self._headers = {"Authorization": f"Bearer {key}"}
        self._closed.clear()
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(started,),
                                        name=f"openai-{self.model_id}", daemon=True)
        self._thread.start()
        started.result()

    def submit(self, requests: Sequence[EngineRequest]) -> list[Future[EngineOutput]]:
        futures: list[Future[EngineOutput]] = [Future() for _ in requests]
        loop = self._loop
        if loop is None or self._closed.is_set():
            for future in futures:
                future.set_exception(EngineFailed("engine unavailable: engine is closed"))
            return futures
        loop.call_soon_threadsafe(self._admit, list(zip(requests, futures, strict=True)))
        return futures

    def abort(self, request_ids: Sequence[str]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel, list(request_ids))

    def stats(self) -> EngineStats:
        loop = self._loop
        if loop is None:
            return EngineStats()
        try:
            return asyncio.run_coroutine_threadsafe(self._snapshot(), loop).result(1.0)
        except Exception:  # closing, or a busy loop: an empty snapshot this time
            return EngineStats()

    def ping(self, timeout: float) -> bool:
        """Whether the server answered the last check (and this loop still runs)."""
        return self.reachable and self._loop is not None and not self._closed.is_set()

    def sleep(self) -> None:
        raise EngineFailed("an openai engine cannot sleep: its server holds the model")

    def wake_up(self) -> None:
        raise EngineFailed("an openai engine cannot sleep: its server holds the model")

    def close(self) -> None:
        """Finish the open requests, then close the session and the loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._closed.set()
        loop.call_soon_threadsafe(lambda: None)  # wakes the loop's wait for the end
        thread.join()
        self._loop = self._thread = None

    # --- the loop thread ---------------------------------------------------------------------

    def _main(self, started: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run(started, loop))
        finally:
            loop.close()

    async def _run(self, started: Future[None], loop: asyncio.AbstractEventLoop) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.config.max_in_flight + 4,
                                         keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        async with aiohttp.ClientSession(base_url=self.base_url + "/", connector=connector,
                                         timeout=timeout, headers=self._headers,
                                         json_serialize=json.dumps) as session:
            self._session = session
            self._check_now = asyncio.Event()
            self._loop = loop
            await self._check()  # the first answer is known when start() returns
            started.set_result(None)
            self._watcher = asyncio.create_task(self._watch())
            while not self._closed.is_set():
                await asyncio.sleep(0.1)
            self._watcher.cancel()
            for future in self._drop_waiting():
                future.set_exception(EngineFailed("engine stopped before serving the request"))
            tasks = [task for task, *_ in self._open.values()]
            if tasks:
                await asyncio.wait(tasks)

    def _drop_waiting(self) -> list[Future[EngineOutput]]:
        dropped = [future for *_, future in self._waiting]
        self._waiting.clear()
        return dropped

    async def _watch(self) -> None:
        assert self._check_now is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self.config.health_interval_s)
            self._check_now.clear()
            await self._check()

    async def _check(self) -> None:
        """Ask the server for its models; reachable only if it lists this one."""
        assert self._session is not None
        try:
            async with self._session.get("models", timeout=_timeout(HEALTH_TIMEOUT_S)) as r:
                if r.status in (401, 403):
                    key = self.config.api_key_env
                    reason = (f"{self.base_url} refused the key in {key} ({r.status})" if key
                              else f"{self.base_url} wants an API key ({r.status}): set "
                                   f"api_key_env")
                    self._reachability(False, reason)
                    return
                if r.status != 200:
                    self._reachability(False, f"{self.base_url}/models answered {r.status}")
                    return
                listing = await r.json(content_type=None)
        except Exception as e:  # refused, reset, timed out, not JSON
            self._reachability(False, f"{self.base_url} unreachable: {_describe(e)}")
            return
        models = {m.get("id"): m for m in listing.get("data", []) if isinstance(m, dict)}
        if self.served_name not in models:
            self._reachability(False, f"{self.base_url} does not serve {self.served_name!r} "
                                      f"(it serves {sorted(map(str, models))})")
            return
        self.max_model_len = int(models[self.served_name].get("max_model_len") or 0)
        self._reachability(True, "")

    def _reachability(self, up: bool, reason: str) -> None:
        changed = up != self.reachable or (not up and self.reason != reason)
        self.reachable, self.reason = up, reason
        if not changed:
            return
        if up:
            log.info("server %s serves %r: engine reachable", self.base_url, self.served_name)
        else:
            log.error("engine %s unreachable: %s", self.model_id, reason)
        if self.on_reachable is not None:
            try:
                self.on_reachable(up, reason)
            except Exception:
                log.exception("reachability handler failed")
        if not up:  # what waits here would only fail later: back to the queue now
            for future in self._drop_waiting():
                future.set_exception(unreachable(reason))

    def _admit(self, items: list[tuple[EngineRequest, Future[EngineOutput]]]) -> None:
        for request, future in items:
            if not self.reachable:
                future.set_exception(unreachable(self.reason))
                continue
            heapq.heappush(self._waiting, (request.priority, next(self._order), request, future))
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._open) < self.config.max_in_flight:
            _, _, request, future = heapq.heappop(self._waiting)
            if request.request_id in self._open:  # a redelivered copy of a request still open
                self._open[request.request_id][2].append(future)
                continue
            futures = [future]
            task = asyncio.create_task(self._serve(request, futures))
            self._open[request.request_id] = (task, request, futures)
        stats = self._stats
        stats.max_running = max(stats.max_running, len(self._open))

    def _cancel(self, request_ids: list[str]) -> None:
        ids = set(request_ids)
        kept = [item for item in self._waiting if item[2].request_id not in ids]
        for _, _, request, future in self._waiting:
            if request.request_id in ids:
                future.set_result(EngineOutput("", "abort", 0, 0))
        if len(kept) != len(self._waiting):
            self._waiting = kept
            heapq.heapify(self._waiting)
        for request_id in ids:
            entry = self._open.get(request_id)
            if entry is not None:
                entry[0].cancel()  # closes its connection: the server aborts the request

    async def _serve(self, request: EngineRequest, futures: list[Future[EngineOutput]]) -> None:
        outcome: EngineOutput | Exception
        try:
            outcome = await self._call(request)
        except asyncio.CancelledError:
            outcome = EngineOutput("", "abort", 0, 0)
        except EngineUnreachable as e:
            outcome = self._lost(e)
        except ServerError as e:  # a server shutting down answers 500 for a while
            outcome = await self._again(request, e)
        except Exception as e:
            outcome = e
        if isinstance(outcome, EngineOutput) and outcome.finish_reason != "abort":
            self._stats.requests_served += 1
            self._stats.tokens_generated += outcome.completion_tokens
        self._open.pop(request.request_id, None)
        for future in futures:
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        self._start_waiting()

    def _lost(self, error: EngineUnreachable) -> EngineUnreachable:
        """A request could not reach the server: unreachable now; the watcher checks at once
        and says when it is back."""
        self._reachability(False, str(error).removeprefix(UNREACHABLE))
        assert self._check_now is not None
        self._check_now.set()
        return error

    async def _again(self, request: EngineRequest, error: ServerError
                     ) -> EngineOutput | Exception:
        """After a 5xx: the request once more, a second later, unless the server stopped
        answering meanwhile (then the request goes back to the queue). A second 5xx fails it,
        and so does the first for a streamed text (its reader already holds part of it)."""
        await asyncio.sleep(RETRY_AFTER_S)
        await self._check()
        if not self.reachable:
            return unreachable(self.reason)
        if request.on_text is not None:
            return error
        try:
            return await self._call(request)
        except EngineUnreachable as e:
            return self._lost(e)
        except asyncio.CancelledError:
            return EngineOutput("", "abort", 0, 0)
        except Exception as e:
            return e

    async def _call(self, request: EngineRequest) -> EngineOutput:
        import aiohttp

        assert self._session is not None
        chat = request.messages is not None
        path = "chat/completions" if chat else "completions"
        body = request_body(request, self.served_name)
        try:
            async with self._session.post(path, json=body) as response:
                if response.status != 200:
                    raise _server_error(response.status, await response.text(), self.base_url)
                if request.on_text is not None:
                    output = await _read_stream(response, request.on_text, chat=chat)
                else:
                    output = read_output(await response.json(content_type=None), chat=chat)
        except TimeoutError:
            raise EngineFailed(f"{self.base_url} did not answer within "
                               f"{self.config.request_timeout_s:g}s (request_timeout_s)"
                               ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
            raise unreachable(f"{self.base_url}: {_describe(e)}") from None
        if output.finish_reason == "abort":  # not ours (a revoke cancels): a server stopping
            raise ServerError(f"{self.base_url} aborted the request")
        return output

    async def _snapshot(self) -> EngineStats:
        stats = EngineStats(**{k: getattr(self._stats, k) for k in EngineStats.__slots__})
        stats.running, stats.waiting = len(self._open), len(self._waiting)
        by_priority: dict[int, list[int]] = {}
        for _, request, _ in self._open.values():
            by_priority.setdefault(request.priority, [0, 0])[0] += 1
        for priority, *_ in self._waiting:
            by_priority.setdefault(priority, [0, 0])[1] += 1
        stats.by_priority = dict(sorted(by_priority.items()))
        return stats


def request_body(request: EngineRequest, served_name: str) -> dict[str, Any]:
    """The server's request: OpenAI's fields, and vLLM's extras by their own names."""
    sampling = dict(request.sampling)
    sampling.pop("structured_outputs", None)  # the server builds its own from api_fields
    body: dict[str, Any] = {"model": served_name}
    if request.messages is not None:
        # Fields left unset are left out: servers check messages against OpenAI's own shapes.
        body["messages"] = [{k: v for k, v in m.items() if v is not None}
                            for m in request.messages]
        if request.tools:
            body["tools"] = request.tools
        top = sampling.pop("logprobs", None)
        if top is not None:  # chat's shape: a flag and the number of alternatives
            body |= {"logprobs": True, "top_logprobs": top}
    else:
        body["prompt"] = request.prompt
    body |= sampling
    body |= request.api_fields or {}
    if request.on_text is not None:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def read_output(answer: dict[str, Any], *, chat: bool) -> EngineOutput:
    """An EngineOutput from the server's whole answer."""
    choice = answer["choices"][0]
    usage = answer.get("usage") or {}
    if chat:
        message = choice.get("message") or {}
        text = message.get("content") or ""
        calls = server_calls(message.get("tool_calls"))
        logprobs = chat_logprobs((choice.get("logprobs") or {}).get("content"))
    else:
        text, calls = choice.get("text") or "", None
        logprobs = completion_logprobs(choice.get("logprobs"))
    return EngineOutput(
        text=text,
        finish_reason=FINISH_REASONS.get(choice.get("finish_reason"),
                                         choice.get("finish_reason")),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        logprobs=logprobs,
        tool_calls=calls,
    )


async def _read_stream(response: Any, on_text: Callable[[str], None], *,
                       chat: bool) -> EngineOutput:
    """Hand each delta of a streamed answer to ``on_text``; the whole answer at its end."""
    parts: list[str] = []
    tokens: list[dict[str, Any]] = []
    finish: str | None = None
    usage: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            piece = ((choice.get("delta") or {}).get("content") if chat
                     else choice.get("text")) or ""
            if piece:
                parts.append(piece)
                on_text(piece)
            more = (chat_logprobs((choice.get("logprobs") or {}).get("content")) if chat
                    else completion_logprobs(choice.get("logprobs")))
            tokens.extend(more or [])
            finish = choice.get("finish_reason") or finish
    return EngineOutput(
        text="".join(parts),
        finish_reason=FINISH_REASONS.get(finish, finish) or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        logprobs=tokens or None,
    )


def server_calls(calls: Any) -> list[Call] | None:
    """The tool calls the server's parser found (None if none, or if one does not read as a
    call: the fleet then reads the text itself)."""
    if not calls:
        return None
    out = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            return None
        if not isinstance(arguments, dict) or not function.get("name"):
            return None
        out.append(Call(function["name"], arguments))
    return out


def chat_logprobs(content: Any) -> list[dict[str, Any]] | None:
    """Chat's logprobs as the fleet's result holds them (the server reports no token ids)."""
    if content is None:
        return None
    return [{"token": t.get("token", ""), "token_id": None, "logprob": t.get("logprob"),
             "top_logprobs": [{"token": c.get("token", ""), "token_id": None,
                               "logprob": c.get("logprob")}
                              for c in t.get("top_logprobs") or []]}
            for t in content]


def completion_logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    """Completions' logprobs (parallel lists) as the fleet's result holds them."""
    if not logprobs or logprobs.get("tokens") is None:
        return None
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return [{"token": token, "token_id": None, "logprob": logprob,
             "top_logprobs": [{"token": t, "token_id": None, "logprob": lp}
                              for t, lp in (top or {}).items()]}
            for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                           tops, strict=False)]


def _server_error(status: int, text: str, base_url: str) -> Exception:
    """What a non-200 answer means for the request (the server's message kept)."""
    try:
        parsed = json.loads(text)
        error = parsed.get("error", parsed)
        message = error.get("message", text) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = text
    message = " ".join(str(message).split())[:2000]
    if status in (401, 403, 429, 502, 503, 504):  # not this request's fault: back to the queue
        return unreachable(f"{base_url} answered {status}: {message}")
    if 400 <= status < 500:
        if "maximum context length" in message or "max_model_len" in message:
            return PromptTooLong(f"prompt: {message}")
        return InvalidRequest(f"server: {message}")
    return ServerError(f"{base_url} answered {status}: {message}")


#: How an EngineUnreachable's message opens; the reason follows.
UNREACHABLE = "engine unreachable: "


def unreachable(reason: str) -> EngineUnreachable:
    return EngineUnreachable(UNREACHABLE + reason)


def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
