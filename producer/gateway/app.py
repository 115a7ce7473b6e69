"""The gateway's HTTP routes: OpenAI's API in front of the fleet's queues.

Each request becomes one fleet task per choice on its model's queue (validated first, exactly
as ``.delay()`` validates), and its answer is read from the result backend (or, streaming, from
the task's stream). Nothing is kept between requests, so any number of gateways can serve one
fleet behind a load balancer. Starlette under uvicorn, as vLLM's own server.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from celery.exceptions import TaskRevokedError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from producer import errors
from producer.gateway import openai
from producer.gateway.metrics import Metrics
from producer.gateway.models import READY_STATES, ModelDirectory
from producer.gateway.openai import RETRY_AFTER_S, ApiError, Call, api_error
from producer.gateway.results import Results, follow
from producer.schema import Completion, to_wire
from producer.settings import FleetSettings
from producer.streams import completion_of
from producer.tasks import check_size

log = logging.getLogger("fleet.gateway")

class Gateway:
    """What the routes share: settings, the task senders, the waiters, the model directory."""

    def __init__(self, settings: FleetSettings, *, insecure: bool = False) -> None:
        self.settings = settings
        self.insecure = insecure
        self.keys = {name: key.get_secret_value()
                     for name, key in settings.gateway_api_keys.items()}
        self.models = ModelDirectory(settings)
        self.metrics = Metrics()
        # Celery's publish is blocking: a few threads send, none waits for an answer.
        self.senders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="send")
        self.redis: Any = None
        self.results: Results | None = None
        self.store: Any = None
        self.driver: Any = None

    async def start(self) -> None:
        import redis.asyncio

        from producer.backend import ResultBackend
        from producer.celery_app import app

        ResultBackend.subscribe_on_send = False  # results are waited for here, not by get()
        self.backend = app.backend
        self.redis = redis.asyncio.Redis.from_url(self.settings.backend_url,
                                                  max_connections=None)
        self.results = Results(self.redis, self.backend)
        await self.results.start()
        await self.models.start()
        # The Batch API's files and batches: take up the unfinished batches no one drives.
        from producer.gateway.batches import Driver, Store

        self.store = Store(self.settings.gateway_files_dir)
        self.driver = Driver(self.store)
        self.driver.resume_all()

    async def stop(self) -> None:
        if self.driver is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.driver.stop)
        await self.models.stop()
        if self.results is not None:
            await self.results.stop()
        if self.redis is not None:
            await self.redis.aclose()
        self.senders.shutdown(wait=False)

    # --- per request --------------------------------------------------------------------------

    def authorize(self, request: Request) -> str:
        """The name of the caller's key; ApiError 401 without a valid one."""
        if self.insecure and not self.keys:
            return "anonymous"
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        found = None
        for name, key in self.keys.items():  # every key compared: the time says nothing
            if hmac.compare_digest(token.strip().encode(), key.encode()) and \
                    scheme.lower() == "bearer":
                found = name
        if found is None:
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: "
                                "Bearer <key>'", code="invalid_api_key")
        return found

    async def body(self, request: Request) -> dict[str, Any]:
        """The JSON object a request carries; 413 above the message limit (told by the
        Content-Length before the body is read, when the client sends one)."""
        limit = self.settings.max_message_bytes

        def check(size: int) -> None:
            if size > limit:
                raise ApiError(413, f"the request is {size} bytes, above the fleet's limit of "
                                    f"{limit} (FLEET_MAX_MESSAGE_BYTES)", code="request_too_large")

        length = request.headers.get("content-length", "")
        if length.isdigit():
            check(int(length))
        raw = await request.body()
        check(len(raw))
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def model_of(self, call: Call) -> str:
        """The model id a call names; 404 if the fleet does not serve it."""
        try:
            return self.models.resolve(call.model)
        except errors.UnknownModel:
            raise ApiError(404, f"The model `{call.model}` does not exist.", param="model",
                           code="model_not_found") from None

    async def require_engine(self, call: Call, model: str) -> None:
        """503 (with Retry-After) unless an engine of ``model`` is live now."""
        if not await self.models.live_now(model):
            raise ApiError(503, f"no engine of model {call.model!r} is live now; try again "
                                f"later", code="NoEngine",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def timed_out(self) -> ApiError:
        return ApiError(504, f"the fleet did not answer within "
                             f"{self.settings.gateway_timeout_s:g}s (FLEET_GATEWAY_TIMEOUT_S); "
                             f"the task was revoked", code="timeout")

    async def send(self, task: Any, request: Any, task_id: str) -> None:
        """Enqueue a validated request under ``task_id``."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.senders,
                                   functools.partial(task.send, request, task_id=task_id))

    def revoke(self, task_ids: list[str]) -> None:
        """Revoke without waiting (also from a cancelled coroutine): the engine aborts them."""
        from producer.celery_app import app

        loop = asyncio.get_running_loop()
        loop.run_in_executor(self.senders, lambda: app.control.revoke(task_ids))

    async def run_tasks(self, task: Any, requests: list[Any]) -> list[Completion]:
        """Send the requests and wait for their completions (in order); on the gateway's timeout
        revoke what is unfinished and answer 504."""
        assert self.results is not None
        results = self.results
        ids = [str(uuid.uuid4()) for _ in requests]
        waits = [await results.expect(task_id) for task_id in ids]
        try:
            for task_id, request in zip(ids, requests, strict=True):
                await self.send(task, request, task_id)
            try:
                metas = await asyncio.wait_for(asyncio.gather(*waits),
                                               self.settings.gateway_timeout_s)
            except TimeoutError:
                self.revoke(ids)
                raise self.timed_out() from None
            return [completion_of(meta, self.backend) for meta in metas]
        except asyncio.CancelledError:
            self.revoke(ids)
            raise
        finally:
            for task_id in ids:
                await results.forget(task_id)


def create_app(settings: FleetSettings, *, insecure: bool = False) -> Starlette:
    """The gateway's ASGI app (``fleet gateway`` serves it with uvicorn)."""
    gw = Gateway(settings, insecure=insecure)

    def route(endpoint: str, handler: Callable[[Request, str], Awaitable[Response]],
              open_: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                who = "" if open_ else gw.authorize(request)
                return await handler(request, who)
            except Exception as e:  # every error leaves in OpenAI's shape
                error = api_error(e)
                if error.status >= 500 and not isinstance(e, ApiError | errors.FleetError):
                    log.exception("%s failed", endpoint)
                gw.metrics.finished(endpoint, getattr(request.state, "model", ""),
                                    error.status)
                return JSONResponse(error.body(), status_code=error.status,
                                    headers=error.headers)

        return run

    async def models(request: Request, who: str) -> Response:
        return JSONResponse({"object": "list", "data": gw.models.listing()})

    async def health(request: Request, who: str) -> Response:
        try:
            await gw.redis.ping()
        except Exception as e:
            return JSONResponse({"status": "redis unreachable", "error": str(e)}, 503)
        name = request.query_params.get("model")
        if name is None:
            return JSONResponse({"status": "ok"})
        try:
            model = gw.models.resolve(name)
        except errors.UnknownModel:
            return JSONResponse({"status": f"model {name!r} is not served"}, 404)
        await gw.models.live_now(model)
        ready = gw.models.live(model, READY_STATES)
        if not ready:
            return JSONResponse({"status": f"no engine of {name!r} is ready"}, 503)
        return JSONResponse({"status": "ok", "engines": [e["engine_id"] for e in ready]})

    async def metrics(request: Request, who: str) -> Response:
        body, content_type = gw.metrics.render()
        return Response(body, media_type=content_type)

    async def chat(request: Request, who: str) -> Response:
        from producer.tasks import chat as chat_task

        call = openai.chat_call(await gw.body(request))
        return await serve(request, who, call, chat_task, [call.kwargs], "chat")

    async def completions(request: Request, who: str) -> Response:
        from producer.tasks import generate as generate_task

        call = openai.completion_call(await gw.body(request))
        items = [{**call.kwargs, "prompt": p} for p in call.prompts]
        return await serve(request, who, call, generate_task, items, "completions")

    async def serve(request: Request, who: str, call: Call, task: Any,
                    items: list[dict[str, Any]], endpoint: str) -> Response:
        if call.ignored:
            log.warning("ignored fields of a %s request: %s", endpoint, ", ".join(call.ignored))
        model = gw.model_of(call)
        request.state.model = model
        stream = call.streams_text
        # The key's own priority, where the body names none.
        level = gw.settings.gateway_key_priorities.get(who)
        if level is not None:
            items = [{"priority": level, **item} for item in items]
        try:
            requests = [task.validate((), {**item, "model": model,
                                           **({"stream": True} if stream else {})})
                        for item in items]
            for one in requests:
                check_size(to_wire(one))
        except errors.FleetError as e:
            raise api_error(e, call) from None
        await gw.require_engine(call, model)
        created = int(time.time())
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        response_id = prefix + uuid.uuid4().hex
        started = time.perf_counter()
        if call.stream:
            return StreamingResponse(
                stream_answer(call, task, requests, model, endpoint, response_id, created,
                              started), media_type="text/event-stream")
        with gw.metrics.in_flight(model):
            try:
                done = await gw.run_tasks(task, requests)
            except errors.FleetError as e:
                raise api_error(e, call) from None
            except TaskRevokedError as e:
                raise ApiError(503, f"the task was revoked: {e}") from None
        gw.metrics.completed(endpoint, model, done, time.perf_counter() - started)
        if endpoint == "chat":
            body = openai.chat_response(done[0], response_id=response_id, created=created,
                                        model=call.model, top_logprobs=call.top_logprobs)
        else:
            body = openai.completion_response(done, response_id=response_id, created=created,
                                              model=call.model)
        return JSONResponse(body)

    async def stream_answer(call: Call, task: Any, requests: list[Any], model: str,
                            endpoint: str, response_id: str, created: int,
                            started: float) -> AsyncIterator[str]:
        """The SSE events of a streamed answer; a failure is an error event, then [DONE]."""
        head = {"id": response_id,
                "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
                "created": created, "model": call.model}
        queue: asyncio.Queue[tuple[int, Any, bool]] = asyncio.Queue()
        ids = [str(uuid.uuid4()) for _ in requests]
        ended: set[int] = set()  # choices whose task finished (with a result or an error)
        completions: dict[int, Completion] = {}
        first = True
        runners: list[asyncio.Task[None]] = []
        results = gw.results
        assert results is not None
        with gw.metrics.in_flight(model):
            try:
                for i, (task_id, one) in enumerate(zip(ids, requests, strict=True)):
                    # A reply read whole (tools, logprobs) streams nothing: wait for its result.
                    whole = None if call.streams_text else await results.expect(task_id)
                    await gw.send(task, one, task_id)
                    runners.append(asyncio.create_task(_feed(i, task_id, queue, whole)))
                if endpoint == "chat":
                    yield _event({**head, "choices": [{
                        "index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}],
                        "prompt_token_ids": None, "prompt_text": None})
                while len(completions) < len(requests):
                    index, item, over = await queue.get()
                    if over:
                        ended.add(index)
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, str):
                        if first:
                            gw.metrics.first_token(model, time.perf_counter() - started)
                            first = False
                        yield _event(_piece(endpoint, head, index, item))
                        continue
                    completions[index] = item
                    for chunk in _ending(endpoint, head, index, item, call):
                        yield _event(chunk)
                if call.include_usage:
                    answered = list(completions.values())
                    yield _event(openai.usage_chunk(head, sum(c.prompt_tokens for c in answered),
                                                    sum(c.completion_tokens for c in answered)))
                gw.metrics.completed(endpoint, model, list(completions.values()),
                                     time.perf_counter() - started)
            except Exception as e:
                error = api_error(e, call)
                yield _event(error.body())
                gw.metrics.finished(endpoint, model, error.status)
            finally:
                unfinished = [t for i, t in enumerate(ids) if i not in ended]
                if unfinished:  # the client left (or the stream failed): stop them
                    gw.revoke(unfinished)
                if not call.streams_text:  # their results were waited for: stop listening
                    for task_id in ids:
                        await results.forget(task_id)
                for runner in runners:
                    runner.cancel()
        yield "data: [DONE]\n\n"

    async def _feed(index: int, task_id: str, queue: asyncio.Queue[tuple[int, Any, bool]],
                    whole: asyncio.Future[dict[str, Any]] | None) -> None:
        """Put one task's pieces, then its Completion or its error, on ``queue`` (with whether
        the task finished)."""
        assert gw.results is not None
        try:
            async with asyncio.timeout(settings.gateway_timeout_s):
                if whole is not None:
                    meta: dict[str, Any] | None = await whole
                else:
                    async for piece in follow(gw.redis, task_id, gw.results):
                        queue.put_nowait((index, piece, False))
                    meta = await gw.results.stored(task_id)
                    while meta is None:  # the end mark follows the stored result: rarely here
                        await asyncio.sleep(0.05)
                        meta = await gw.results.stored(task_id)
        except TimeoutError:
            queue.put_nowait((index, gw.timed_out(), False))
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait((index, e, False))
            return
        assert meta is not None
        try:
            queue.put_nowait((index, completion_of(meta, gw.backend), True))
        except Exception as e:  # the task's own error
            queue.put_nowait((index, e, True))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    # --- the Batch API: files and batches (producer/gateway/batches.py) ------------------------

    async def create_file(request: Request, who: str) -> Response:
        from starlette.concurrency import run_in_threadpool

        limit = gw.settings.gateway_max_file_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the file is above the gateway's limit of {limit} bytes "
                                f"(FLEET_GATEWAY_MAX_FILE_BYTES)", code="file_too_large")
        form = await request.form(max_part_size=limit)
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            raise ApiError(400, f"purpose: only 'batch' is served (got {purpose!r})",
                           param="purpose")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file: a file part is required", param="file")
        meta = await run_in_threadpool(gw.store.add_file, upload.filename or "upload.jsonl",
                                       purpose, upload.file)
        return JSONResponse(meta)

    async def get_file(request: Request, who: str) -> Response:
        return JSONResponse(gw.store.public_file(request.path_params["file_id"]))

    async def file_content(request: Request, who: str) -> Response:
        from starlette.responses import FileResponse

        return FileResponse(gw.store.content(request.path_params["file_id"]),
                            media_type="application/jsonl")

    async def create_batch(request: Request, who: str) -> Response:
        batch = gw.store.create_batch(await gw.body(request))
        gw.driver.start(batch["id"])
        return JSONResponse(batch)

    async def get_batch(request: Request, who: str) -> Response:
        return JSONResponse(gw.store.batch(request.path_params["batch_id"]))

    async def list_batches(request: Request, who: str) -> Response:
        batches = gw.store.batches()
        after = request.query_params.get("after")
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        limit = request.query_params.get("limit", "20")
        n = int(limit) if limit.isdigit() else 20
        page = batches[:max(1, min(n, 100))]
        return JSONResponse({"object": "list", "data": page,
                             "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None,
                             "has_more": len(batches) > len(page)})

    async def cancel_batch(request: Request, who: str) -> Response:
        return JSONResponse(gw.driver.cancel(request.path_params["batch_id"]))

    app = Starlette(routes=[
        Route("/v1/models", route("models", models), methods=["GET"]),
        Route("/v1/chat/completions", route("chat", chat), methods=["POST"]),
        Route("/v1/completions", route("completions", completions), methods=["POST"]),
        Route("/v1/files", route("files", create_file), methods=["POST"]),
        Route("/v1/files/{file_id}", route("files", get_file), methods=["GET"]),
        Route("/v1/files/{file_id}/content", route("files", file_content), methods=["GET"]),
        Route("/v1/batches", route("batches", create_batch), methods=["POST"]),
        Route("/v1/batches", route("batches", list_batches), methods=["GET"]),
        Route("/v1/batches/{batch_id}", route("batches", get_batch), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", route("batches", cancel_batch),
              methods=["POST"]),
        Route("/health", route("health", health, open_=True), methods=["GET"]),
        Route("/metrics", route("metrics", metrics, open_=True), methods=["GET"]),
    ], lifespan=lifespan)
    app.state.gateway = gw
    return app


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _piece(endpoint: str, head: dict[str, Any], index: int, text: str) -> dict[str, Any]:
    if endpoint == "chat":
        return openai.chat_chunk(head, {"content": text})
    return openai.completion_chunk(head, index, text)


def _ending(endpoint: str, head: dict[str, Any], index: int, c: Completion,
            call: Call) -> list[dict[str, Any]]:
    """The chunks that close one choice: what was not streamed (a reply read whole: tool
    calls, logprobs), then its finish reason."""
    chunks = []
    whole = not call.streams_text
    if endpoint == "chat":
        if whole:
            delta: dict[str, Any] = {"content": c.text if c.text or not c.tool_calls else None}
            if c.tool_calls:
                delta["tool_calls"] = openai.tool_call_deltas(c)
            chunks.append(openai.chat_chunk(
                head, delta, logprobs=openai.chat_logprobs(c.logprobs, call.top_logprobs)))
        chunks.append(openai.chat_chunk(head, {}, finish_reason=c.finish_reason))
    else:
        if whole:
            chunks.append(openai.completion_chunk(
                head, index, c.text, logprobs=openai.completion_logprobs(c.logprobs)))
        chunks.append(openai.completion_chunk(head, index, "", finish_reason=c.finish_reason))
    return chunks
