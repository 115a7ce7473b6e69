"""Batch files: an OpenAI batch file through the fleet, each result written as it arrives.

``fleet batch run INPUT.jsonl -o OUTPUT.jsonl`` (and :func:`run_batch` behind it). The input is
OpenAI's batch format, which ``vllm run-batch`` also reads: one request a line, ``{"custom_id",
"method": "POST", "url": "/v1/chat/completions" or "/v1/completions", "body": {...}}``. It is
read as a stream; each line is validated on its own exactly as the gateway validates a request
body (an invalid line becomes an error line naming the field, the rest run), and the valid ones
travel in many-request chunks (``fleet.chat_many``/``fleet.generate_many``) at the ``batch``
priority, a bounded number of chunks in flight, so a file of any length runs in bounded memory.

Each result is one line of OpenAI's output format, ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``: the body is the ``chat.completion`` or
``text_completion`` object the gateway would have answered, or, for a failed request, OpenAI's
error object with its HTTP status. Lines are appended and flushed as results arrive (in input
order with ``ordered``), so a killed run leaves at most a partial last line.

Running the same job again resumes it: the partial last line is cut off, every ``custom_id``
already in the output is skipped, only the rest is sent, and no ``custom_id`` is written twice;
``retry_failed`` also sends again the requests whose line is an error (their error lines are
removed first).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from producer import errors
from producer.errors import FleetError, InvalidRequest
from producer.gateway import openai
from producer.gateway.openai import ApiError, Call
from producer.schema import MAX_BATCH, Completion, ItemResult, ManyRequest, Scheduling, parse

log = logging.getLogger(__name__)

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
#: Requests per message (task ``fleet.*_many``).
DEFAULT_CHUNK = 256
#: Messages in flight at once: enough to keep several engines' batches full.
DEFAULT_WINDOW = 32
#: Seconds between two looks at the results of the messages in flight.
POLL_S = 0.05


@dataclass
class Summary:
    """What a run did."""

    total: int = 0
    """Lines in the input."""
    skipped: int = 0
    """Lines whose ``custom_id`` already had a result in the output (a resumed job)."""
    succeeded: int = 0
    failed: dict[int, int] = field(default_factory=dict)
    """Error lines written, by HTTP status (400: the line or its request is invalid)."""
    duplicates: int = 0
    """Lines whose ``custom_id`` an earlier line of the input already has (not run)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    cancelled: bool = False
    output: str = ""
    errors: str = ""
    """Where the error lines are (the output itself unless told otherwise)."""

    @property
    def done(self) -> int:
        return self.skipped + self.succeeded + sum(self.failed.values()) + self.duplicates


@dataclass
class _Line:
    """One valid input line on its way: its requests and how its answer is written."""

    index: int
    custom_id: str
    kind: str
    call: Call
    parts: int
    outcomes: list[Completion | FleetError | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outcomes = [None] * self.parts


def run_batch(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *,
              errors_path: str | os.PathLike[str] | None = None, ordered: bool = False,
              retry_failed: bool = False, priority: int | str = "batch",
              chunk_size: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW,
              on_progress: Callable[[Summary], None] | None = None,
              stop: threading.Event | None = None, url: str | None = None) -> Summary:
    """Run a batch file through the fleet (see the module's docstring); returns its summary.
    A KeyboardInterrupt, or ``stop`` set, revokes what is in flight (the engines abort it),
    keeps what was written, and returns the summary with ``cancelled`` set. With ``url``,
    every line must be for that endpoint (a Batch API batch has one)."""
    if not 1 <= chunk_size <= MAX_BATCH:
        raise InvalidRequest(f"chunk_size: from 1 to {MAX_BATCH} (got {chunk_size})")
    if window < 1:
        raise InvalidRequest(f"window: at least 1 (got {window})")
    level = parse(Scheduling, {"priority": priority}).priority
    assert level is not None
    output = Path(output_path)
    errors_file = Path(errors_path) if errors_path is not None else output
    summary = Summary(output=str(output), errors=str(errors_file))
    summary.total = count_lines(Path(input_path))
    resumed = recover(output, errors_file, retry_failed)
    started = time.monotonic()
    job = _Job(summary, level, chunk_size, resumed, url)
    with _Writer(output, errors_file, ordered) as writer:
        job.writer = writer
        try:
            for index, raw in enumerate(_lines(Path(input_path))):
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                job.take(index, raw)
                job.send_full_chunks()
                job.collect(wait=False)
                _report(on_progress, summary, started)
                while job.in_flight_count() >= window:
                    if stop is not None and stop.is_set():
                        raise KeyboardInterrupt
                    job.collect(wait=True)
                    _report(on_progress, summary, started)
            job.send_full_chunks(flush=True)
            while job.in_flight_count():
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                job.collect(wait=True)
                _report(on_progress, summary, started)
        except KeyboardInterrupt:
            job.cancel()
            summary.cancelled = True
    summary.wall_s = time.monotonic() - started
    _report(on_progress, summary, started)
    return summary


def _report(on_progress: Callable[[Summary], None] | None, summary: Summary,
            started: float) -> None:
    if on_progress is not None:
        summary.wall_s = time.monotonic() - started
        on_progress(summary)


def count_lines(path: Path) -> int:
    """Lines of a file (a last line without a newline counts), read in blocks."""
    n, last = 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def recover(output: Path, errors_file: Path, retry_failed: bool) -> set[int]:
    """The ``custom_id`` hashes that already have a line (to skip), after cutting off a
    partial last line; with ``retry_failed`` the error lines are removed and not counted.
    Hashes, not the ids: a million of them fit in a few tens of megabytes."""
    seen: set[int] = set()
    for path in dict.fromkeys([output, errors_file]):
        if not path.exists():
            continue
        _cut_partial_line(path)
        if retry_failed:
            _drop_error_lines(path)
        with path.open("rb") as f:
            for raw in f:
                custom_id = _custom_id_of(raw)
                if custom_id is not None:
                    seen.add(hash(custom_id))
    return seen


def _cut_partial_line(path: Path) -> None:
    """A run killed while writing leaves a last line without its newline: cut it off."""
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        at = end
        while at > 0:
            step = min(at, 1 << 16)
            f.seek(at - step)
            block = f.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                at = at - step + cut + 1
                break
            at -= step
        if at != end:
            log.warning("%s: removed a partial last line (%d bytes)", path, end - at)
            f.truncate(at)


def _drop_error_lines(path: Path) -> None:
    kept = path.with_name(path.name + ".tmp")
    with path.open("rb") as f, kept.open("wb") as out:
        for raw in f:
            if not _is_error(raw):
                out.write(raw)
    os.replace(kept, path)


def _parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def _custom_id_of(raw: bytes) -> str | None:
    line = _parsed(raw)
    custom_id = line.get("custom_id") if line else None
    return custom_id if isinstance(custom_id, str) else None


def _is_error(raw: bytes) -> bool:
    line = _parsed(raw)
    if line is None:
        return True
    response = line.get("response") or {}
    return line.get("error") is not None or response.get("status_code") != 200


class BadLine(Exception):
    """An input line that cannot run: the error it is answered with, and its custom_id when
    it has a readable one."""

    def __init__(self, custom_id: str | None, error: ApiError) -> None:
        super().__init__(error.message)
        self.custom_id = custom_id
        self.error = error


def parse_line(raw: bytes, url: str | None = None) -> tuple[str, str, Call]:
    """An input line's ``custom_id``, kind (``chat`` or ``completions``) and the fleet call of
    its body, read as the gateway reads a body; BadLine naming the field at fault."""
    line = _parsed(raw)
    if line is None:
        raise BadLine(None, ApiError(400, "the line is not a JSON object"))
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(None, ApiError(400, "custom_id: a non-empty string is required",
                                     param="custom_id"))
    try:
        if line.get("method") != "POST":
            raise ApiError(400, f"method: must be 'POST' (got {line.get('method')!r})",
                           param="method")
        kind = URLS.get(str(line.get("url")))
        if url is not None and line.get("url") != url:
            raise ApiError(400, f"url: this batch's endpoint is {url} (got "
                                f"{line.get('url')!r})", param="url")
        if kind is None:
            raise ApiError(400, f"url: one of {', '.join(URLS)} (got {line.get('url')!r})",
                           param="url")
        body = line.get("body")
        if not isinstance(body, dict):
            raise ApiError(400, "body: a JSON object is required", param="body")
        if body.get("stream"):
            raise ApiError(400, "body.stream: a batch request is not streamed",
                           param="body.stream")
        call = openai.chat_call(body) if kind == "chat" else openai.completion_call(body)
    except ApiError as e:
        raise BadLine(custom_id, e) from None
    return custom_id, kind, call


class _Writer:
    """Appends result lines to the output (and the error file), flushed as they are written;
    with ``ordered`` a line waits until every line before it in the input is written."""

    def __init__(self, output: Path, errors_file: Path, ordered: bool) -> None:
        self.paths = (output, errors_file)
        self.ordered = ordered
        self.files: dict[Path, IO[bytes]] = {}
        self.waiting: dict[int, tuple[bytes, bool] | None] = {}
        self.next = 0

    def __enter__(self) -> _Writer:
        for path in dict.fromkeys(self.paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files[path] = path.open("ab")
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def put(self, index: int, line: dict[str, Any] | None, error: bool = False) -> None:
        """The line of input line ``index`` (None: that input line writes nothing)."""
        entry = None if line is None else (json.dumps(line).encode() + b"\n", error)
        if not self.ordered:
            if entry is not None:
                self._write(*entry)
            return
        self.waiting[index] = entry
        while self.next in self.waiting:
            ready = self.waiting.pop(self.next)
            if ready is not None:
                self._write(*ready)
            self.next += 1

    def _write(self, data: bytes, error: bool) -> None:
        f = self.files[self.paths[1] if error else self.paths[0]]
        f.write(data)
        f.flush()


class _Job:
    """The lines on their way: chunks being filled, messages in flight, results read."""

    def __init__(self, summary: Summary, priority: int, chunk_size: int,
                 resumed: set[int], url: str | None = None) -> None:
        from producer.celery_app import app
        from producer.settings import get_settings

        self.app = app
        self.backend = app.backend
        self.settings = get_settings()
        self.summary = summary
        self.priority = priority
        self.chunk_size = chunk_size
        self.url = url
        #: custom_id hashes with a line from an earlier run, and those taken in this one.
        self.resumed = resumed
        self.seen: set[int] = set()
        self.writer: _Writer | None = None
        #: (kind, model id) -> the parts waiting to be sent: (line, part index, item kwargs).
        self.filling: dict[tuple[str, str], list[tuple[_Line, int, dict[str, Any]]]] = {}
        #: task id -> the parts its message carries.
        self.in_flight: dict[str, list[tuple[_Line, int]]] = {}
        self.created = int(time.time())

    def in_flight_count(self) -> int:
        return len(self.in_flight)

    # --- reading the input -------------------------------------------------------------------

    def take(self, index: int, raw: bytes) -> None:
        """Read input line ``index``: skip it, answer it with an error, or queue its parts."""
        if not raw.strip():
            self.summary.total -= 1  # a blank line is no request
            return self._put(index, None)
        try:
            custom_id, kind, call = parse_line(raw, self.url)
        except BadLine as e:
            if e.custom_id is not None and self._taken_before(e.custom_id):
                return self._put(index, None)
            return self._fail(index, e.custom_id, e.error, f"line {index + 1}: ")
        if self._taken_before(custom_id):
            return self._put(index, None)
        try:
            model = self._model(call.model)
            items = self._items(kind, call, model)
        except ApiError as e:
            return self._fail(index, custom_id, e, "")
        line = _Line(index, custom_id, kind, call, len(items))
        parts = self.filling.setdefault((kind, model), [])
        parts.extend((line, i, item) for i, item in enumerate(items))

    def _taken_before(self, custom_id: str) -> bool:
        """Whether the custom_id has its line already (an earlier run: skipped) or an earlier
        line of this input has it (a duplicate, not run: a custom_id is written once)."""
        key = hash(custom_id)
        if key in self.resumed:
            self.summary.skipped += 1
            return True
        if key in self.seen:
            self.summary.duplicates += 1
            log.warning("custom_id %r: given again; this line is not run", custom_id)
            return True
        self.seen.add(key)
        return False

    def _model(self, name: str) -> str:
        from producer.errors import UnknownModel

        try:
            return self.settings.resolve_model(name)
        except UnknownModel:
            return name  # configured on the workers only: its queue is named as given

    def _items(self, kind: str, call: Call, model: str) -> list[dict[str, Any]]:
        """The validated items of a line (a completions line has one per prompt)."""
        from producer.tasks import chat, generate, item_wire

        task = chat if kind == "chat" else generate
        bodies = [call.kwargs] if kind == "chat" else [
            {**call.kwargs, "prompt": p} for p in call.prompts]
        items = []
        for body in bodies:
            # The job's priority is every request's (a chunk is one message in the queue).
            body = {k: v for k, v in body.items() if k != "priority"}
            try:
                request = task.validate((), {**body, "model": model})
            except InvalidRequest as e:
                raise openai.invalid(e, call) from None
            items.append(item_wire(request))
        return items

    # --- sending -----------------------------------------------------------------------------

    def send_full_chunks(self, flush: bool = False) -> None:
        from producer.tasks import chat_many, generate_many

        for (kind, model), parts in list(self.filling.items()):
            while len(parts) >= self.chunk_size or (flush and parts):
                chunk, parts[:] = parts[:self.chunk_size], parts[self.chunk_size:]
                task = chat_many if kind == "chat" else generate_many
                handle = task.send(ManyRequest(requests=[item for _, _, item in chunk],
                                               model=model, priority=self.priority))
                self.in_flight[handle.id] = [(line, i) for line, i, _ in chunk]
            if not parts:
                del self.filling[(kind, model)]

    # --- results -----------------------------------------------------------------------------

    def collect(self, *, wait: bool) -> None:
        """Write the lines whose every part has its result; with ``wait``, until at least one
        message in flight has finished."""
        while self.in_flight:
            ids = list(self.in_flight)
            keys = [self.backend.get_key_for_task(i) for i in ids]
            found = [(i, k, raw) for i, k, raw in zip(ids, keys, self.backend.client.mget(keys),
                                                      strict=True) if raw is not None]
            for task_id, _, raw in found:
                meta = self.backend.decode_result(raw)
                if meta.get("status") not in ("SUCCESS", "FAILURE", "REVOKED"):
                    continue
                self._finished(task_id, meta)
            done = [k for i, k, _ in found if i not in self.in_flight]
            if done:
                self.backend.client.delete(*done)  # read: no need to keep them in Redis
                return
            if not wait:
                return
            time.sleep(POLL_S)

    def _finished(self, task_id: str, meta: dict[str, Any]) -> None:
        parts = self.in_flight.pop(task_id)
        result = meta.get("result")
        if meta["status"] == "SUCCESS" and isinstance(result, list):
            outcomes: list[Completion | FleetError] = [_item_outcome(item) for item in result]
        else:
            error = self.backend.exception_to_python(result) if isinstance(result, dict) \
                else None
            failure = error if isinstance(error, FleetError) else errors.EngineFailed(
                f"the task failed: {error!r}")
            outcomes = [failure] * len(parts)
        for (line, i), outcome in zip(parts, outcomes, strict=True):
            line.outcomes[i] = outcome
            if all(o is not None for o in line.outcomes):
                self._answer(line)

    def _answer(self, line: _Line) -> None:
        failed = next((o for o in line.outcomes if isinstance(o, FleetError)), None)
        if failed is not None:
            return self._fail(line.index, line.custom_id, openai.api_error(failed, line.call),
                              "")
        done = [o for o in line.outcomes if isinstance(o, Completion)]
        hexid = uuid.uuid4().hex
        if line.kind == "chat":
            body = openai.chat_response(done[0], response_id="chatcmpl-" + hexid,
                                        created=self.created, model=line.call.model,
                                        top_logprobs=line.call.top_logprobs)
        else:
            body = openai.completion_response(done, response_id="cmpl-" + hexid,
                                              created=self.created, model=line.call.model)
        self.summary.succeeded += 1
        self.summary.prompt_tokens += sum(c.prompt_tokens for c in done)
        self.summary.completion_tokens += sum(c.completion_tokens for c in done)
        self._put(line.index, {"id": "batch_req_" + hexid, "custom_id": line.custom_id,
                               "response": {"status_code": 200, "request_id": hexid,
                                            "body": body}, "error": None})

    def _fail(self, index: int, custom_id: str | None, error: ApiError, where: str) -> None:
        summary = self.summary
        summary.failed[error.status] = summary.failed.get(error.status, 0) + 1
        body = error.body()
        body["error"]["message"] = where + body["error"]["message"]
        hexid = uuid.uuid4().hex
        self._put(index, {"id": "batch_req_" + hexid, "custom_id": custom_id,
                          "response": {"status_code": error.status, "request_id": hexid,
                                       "body": body}, "error": None}, error=True)

    def _put(self, index: int, line: dict[str, Any] | None, error: bool = False) -> None:
        assert self.writer is not None
        self.writer.put(index, line, error)

    def cancel(self) -> None:
        """Revoke every message in flight: their engines abort the requests."""
        ids = list(self.in_flight)
        if ids:
            self.app.control.revoke(ids, terminate=True)
        self.in_flight.clear()
        self.filling.clear()


def _item_outcome(item: Any) -> Completion | FleetError:
    try:
        return ItemResult.model_validate(item, strict=False).outcome()
    except ValidationError:
        return FleetError("the request failed")


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this run (the same one)."""
    import shlex

    return " ".join(shlex.quote(a) for a in (argv if argv is not None else
                                             ["fleet", *sys.argv[1:]]))
