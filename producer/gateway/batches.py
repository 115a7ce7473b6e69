"""OpenAI's Batch API on the gateway: files on disk, each batch driven by ``run_batch``.

Everything lives in ``FLEET_GATEWAY_FILES_DIR``, never in Redis: an uploaded file is
``files/<id>`` with its OpenAI file object beside it (``files/<id>.json``); a batch is
``batches/<id>.json`` (OpenAI's batch object, replaced atomically at every change), and its
result lines go to ``batches/<id>.output.jsonl`` and ``batches/<id>.errors.jsonl``, written by
``run_batch`` (``producer/gateway/batchfile.py``) on a thread of the gateway that drives it.
That gateway holds ``batches/<id>.lock`` (``flock``), so that one gateway drives a batch however
many share the folder. A gateway that starts takes up every unfinished batch whose lock is free:
``run_batch`` resumes from the lines already written and never writes a ``custom_id`` twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from producer.gateway.batchfile import URLS, Summary, count_lines, run_batch
from producer.gateway.openai import ApiError

log = logging.getLogger("fleet.gateway.batches")

#: Statuses of a batch that a gateway still has to drive.
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
#: Seconds between two writes of a running batch's counts.
SAVE_EVERY_S = 1.0
#: How long a batch may run (OpenAI accepts only this window).
COMPLETION_WINDOW = "24h"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader sees the old object or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _read(folder: Path, object_id: str, kind: str, param: str) -> dict[str, Any]:
    """A stored object by id; 404 in OpenAI's words when there is none."""
    path = folder / f"{object_id}.json"
    if "/" in object_id or not path.exists():
        raise ApiError(404, f"No such {kind} object: {object_id}", param=param,
                       code="not_found")
    found: dict[str, Any] = json.loads(path.read_text())
    return found


class Store:
    """Files and batches in one folder."""

    def __init__(self, root: Path) -> None:
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one writer of a batch's object at a time, here

    # --- files -------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, source: IO[bytes]) -> dict[str, Any]:
        file_id = "file-" + uuid.uuid4().hex
        path = self.files_dir / file_id
        with path.open("wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
        return self._register(file_id, path, filename, purpose)

    def _register(self, file_id: str, path: Path, filename: str, purpose: str
                  ) -> dict[str, Any]:
        meta = {"id": file_id, "object": "file", "bytes": path.stat().st_size,
                "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                "status": "processed", "expires_at": None, "status_details": None}
        _write_json(self.files_dir / f"{file_id}.json", {**meta, "path": str(path)})
        return meta

    def file(self, file_id: str) -> dict[str, Any]:
        return _read(self.files_dir, file_id, "File", "file_id")

    def public_file(self, file_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.file(file_id).items() if k != "path"}

    def content(self, file_id: str) -> Path:
        return Path(self.file(file_id)["path"])

    # --- batches -----------------------------------------------------------------------------

    def create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise ApiError(400, "input_file_id: a file id is required", param="input_file_id")
        meta = self.file(input_file_id)
        if meta["purpose"] != "batch":
            raise ApiError(400, f"input_file_id: the file's purpose is {meta['purpose']!r}, "
                                f"not 'batch'", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in URLS:
            raise ApiError(400, f"endpoint: one of {', '.join(URLS)} (got {endpoint!r})",
                           param="endpoint")
        if body.get("completion_window") != COMPLETION_WINDOW:
            raise ApiError(400, f"completion_window: must be {COMPLETION_WINDOW!r}",
                           param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ApiError(400, "metadata: an object of strings", param="metadata")
        now = int(time.time())
        batch = {
            "id": "batch_" + uuid.uuid4().hex, "object": "batch", "endpoint": endpoint,
            "errors": None, "input_file_id": input_file_id,
            "completion_window": COMPLETION_WINDOW, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + 24 * 3600, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        self.save(batch)
        return batch

    def batch(self, batch_id: str) -> dict[str, Any]:
        return _read(self.batches_dir, batch_id, "Batch", "batch_id")

    def batches(self) -> list[dict[str, Any]]:
        """Every batch, newest first."""
        found = [json.loads(p.read_text()) for p in self.batches_dir.glob("batch_*.json")]
        return sorted(found, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def save(self, batch: dict[str, Any]) -> None:
        _write_json(self.batches_dir / f"{batch['id']}.json", batch)

    def update(self, batch_id: str, **changes: Any) -> dict[str, Any]:
        """Read, change and write a batch's object under a lock every gateway sharing the folder
        takes (a cancel from one gateway is not overwritten by another's progress)."""
        with self.lock, self.path(batch_id, "update.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            batch = {**self.batch(batch_id), **changes}
            self.save(batch)
            return batch

    def path(self, batch_id: str, suffix: str) -> Path:
        return self.batches_dir / f"{batch_id}.{suffix}"


class Driver:
    """Drives this gateway's share of the unfinished batches, one thread each."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.running: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self.closing = False

    def resume_all(self) -> None:
        for batch in self.store.batches():
            if batch["status"] in UNFINISHED:
                self.start(batch["id"])

    def start(self, batch_id: str) -> bool:
        """Drive a batch here unless another gateway holds its lock."""
        if batch_id in self.running or self.closing:
            return False
        lock = self.store.path(batch_id, "lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return False
        stop = threading.Event()
        thread = threading.Thread(target=self._drive, args=(batch_id, stop, lock),
                                  name=f"batch-{batch_id}", daemon=True)
        self.running[batch_id] = (thread, stop)
        thread.start()
        return True

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.batch(batch_id)
        if batch["status"] not in ("validating", "in_progress", "cancelling"):
            raise ApiError(409, f"Cannot cancel a batch with status {batch['status']!r}",
                           code="batch_not_cancellable")
        batch = self.store.update(batch_id, status="cancelling",
                                  cancelling_at=batch["cancelling_at"] or int(time.time()))
        if batch_id in self.running:
            self.running[batch_id][1].set()
        elif not self.start(batch_id):  # another gateway drives it: it sees the status
            return batch
        return batch

    def stop(self) -> None:
        """Stop driving (the batches stay unfinished on disk for the next gateway)."""
        self.closing = True
        for _, stop in self.running.values():
            stop.set()
        for thread, _ in list(self.running.values()):
            thread.join(timeout=30)

    def _drive(self, batch_id: str, stop: threading.Event, lock: IO[str]) -> None:
        store = self.store
        try:
            batch = store.batch(batch_id)
            if batch["status"] == "cancelling":
                stop.set()
            source = store.content(batch["input_file_id"])
            if batch["status"] == "validating":
                total = count_lines(source)
                batch = store.update(batch_id, status="in_progress",
                                     in_progress_at=int(time.time()),
                                     request_counts={"total": total, "completed": 0,
                                                     "failed": 0})
            output, errors = store.path(batch_id, "output.jsonl"), store.path(
                batch_id, "errors.jsonl")
            if batch["status"] != "finalizing":
                self._run(batch_id, source, output, errors, stop)
            batch = store.batch(batch_id)
            if batch["status"] == "cancelling":
                store.update(batch_id, status="cancelled", cancelled_at=int(time.time()),
                             **self._files(batch_id, output, errors))
            elif not self.closing:
                store.update(batch_id, status="finalizing", finalizing_at=int(time.time()))
                store.update(batch_id, status="completed", completed_at=int(time.time()),
                             **self._files(batch_id, output, errors))
        except Exception as e:
            log.exception("batch %s failed", batch_id)
            store.update(batch_id, status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": [
                             {"code": type(e).__name__, "message": str(e), "param": None,
                              "line": None}]})
        finally:
            self.running.pop(batch_id, None)
            lock.close()

    def _run(self, batch_id: str, source: Path, output: Path, errors: Path,
             stop: threading.Event) -> None:
        store = self.store
        done = {"completed": _count(output), "failed": _count(errors)}
        last = [0.0]

        def progress(s: Summary) -> None:
            now = time.monotonic()
            if now - last[0] < SAVE_EVERY_S and s.done < s.total:
                return
            last[0] = now
            if store.batch(batch_id)["status"] == "cancelling":
                stop.set()
            counts = {"total": s.total,
                      "completed": done["completed"] + s.succeeded,
                      "failed": done["failed"] + sum(s.failed.values()) + s.duplicates}
            store.update(batch_id, request_counts=counts)

        batch = store.batch(batch_id)
        run_batch(source, output, errors_path=errors, url=batch["endpoint"], stop=stop,
                  on_progress=progress)

    def _files(self, batch_id: str, output: Path, errors: Path) -> dict[str, Any]:
        """The output and error files of a finished batch, as file objects (none if empty)."""
        ids: dict[str, Any] = {"output_file_id": None, "error_file_id": None}
        for key, path, suffix in (("output_file_id", output, "output"),
                                  ("error_file_id", errors, "errors")):
            if path.exists() and path.stat().st_size:
                file_id = f"file-{batch_id.removeprefix('batch_')}-{suffix}"
                self.store._register(file_id, path, f"{batch_id}_{suffix}.jsonl",
                                     "batch_output")
                ids[key] = file_id
        return ids


def _count(path: Path) -> int:
    return count_lines(path) if path.exists() else 0
