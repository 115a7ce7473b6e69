"""``fleet top``: its rates (pure functions) and the command itself, live in a pseudo-terminal
and printed once, against a real worker on the fake engine and a queue no engine takes."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from producer.top import Meter, QueueView, Sample, Snapshot, queue_views, rates, record
from producer.topview import render
from tests.harness import Fleet

MODEL = "top-fake"
ENGINE = "topfake1"
STRANDED = "top-none"  # configured, no worker: its tasks wait
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1b\][^\x07]*\x07")


def _sample(at: float, requests: int = 0, tokens: int = 0, failed: int = 0,
            uptime: float | None = None) -> Sample:
    return Sample(at, at if uptime is None else uptime, requests, tokens, failed)


def _history(*samples: Sample, window: float = 5.0) -> tuple[Sample, ...]:
    history: tuple[Sample, ...] = ()
    for sample in samples:
        history = record(history, sample, window)
    return history


def test_rates_span_the_window_and_no_more() -> None:
    # 2 requests/s and 10 tokens/s for 10 s, then a burst in the last second.
    samples = [_sample(t, 2 * t, 10 * t) for t in range(10)] + [_sample(10, 48, 190)]
    history = _history(*samples)
    assert [s.at for s in history] == [5, 6, 7, 8, 9, 10]
    got = rates(history)
    assert got is not None and got.span_s == 5
    assert (got.requests_per_s, got.tokens_per_s) == ((48 - 10) / 5, (190 - 50) / 5)


def test_a_poll_slower_than_the_window_still_has_rates() -> None:
    history = _history(_sample(0, 0, 0), _sample(8, 16, 80), window=5)
    got = rates(history)
    assert got is not None and (got.requests_per_s, got.tokens_per_s, got.span_s) == (2, 10, 8)


def test_one_sample_has_no_rates() -> None:
    assert rates(_history(_sample(0, 5, 5))) is None
    assert rates(()) is None


@pytest.mark.parametrize("after", [
    _sample(2, requests=3, tokens=100, uptime=0.5),  # the uptime went down
    _sample(2, requests=1, tokens=100),              # a counter went down
    _sample(2, requests=3, tokens=10),
    _sample(2, requests=3, tokens=100, failed=0),
], ids=["uptime", "requests", "tokens", "failed"])
def test_an_engine_that_restarted_starts_over(after: Sample) -> None:
    before = _sample(1, requests=2, tokens=50, failed=1)
    history = _history(_sample(0, requests=1, tokens=20, failed=1), before, after)
    assert history == (after,) and rates(history) is None


def test_failures_count_within_the_window() -> None:
    history = _history(_sample(0, failed=4), _sample(3, failed=4), _sample(6, failed=7))
    got = rates(history)
    assert got is not None and got.failures == 3


def test_the_meter_reads_replies_with_or_without_the_newer_keys() -> None:
    meter = Meter(window=5)
    old = {"node": "a@h", "uptime_s": 1.0, "requests_served": 2, "tokens_generated": 20}
    new = {**old, "node": "b@h", "tasks_failed": 1, "waiting": 3, "metrics_url": None}
    assert meter.update([old, new], at=0) == {"a@h": None, "b@h": None}
    later = meter.update([{**old, "uptime_s": 3.0, "requests_served": 6},
                          {**new, "uptime_s": 3.0, "tasks_failed": 2}], at=2)
    assert later["a@h"] is not None and later["a@h"].requests_per_s == 2
    assert later["b@h"] is not None and later["b@h"].failures == 1
    meter.update([old], at=3)
    assert set(meter.histories) == {"a@h"}  # b left: forgotten


def test_every_configured_model_has_a_queue_and_stranded_tasks_show() -> None:
    engines = [{"node": "x@h", "engine_id": "x", "model": "m1", "state": "ready"},
               {"node": "y@h", "engine_id": "y", "model": "m3", "state": "loading"}]
    levels = {"m1": {0: 1, 3: 0, 6: 0, 9: 0}, "m2": {0: 2, 3: 0, 6: 0, 9: 1}, "m3": {0: 4}}
    views = queue_views(["m1", "m2"], levels, engines)
    assert [(v.model, v.depth, v.engines, v.serving, v.stranded) for v in views] == [
        ("m1", 1, 1, 1, False), ("m2", 3, 0, 0, True), ("m3", 4, 1, 0, True)]


def test_render_shows_engines_queues_and_missing_figures() -> None:
    engine = {"node": "e1@h", "host": "h", "engine_id": "e1", "model": "m1", "state": "ready",
              "in_flight": 2, "running": 2, "requests_served": 9, "uptime_s": 3725}
    meter = Meter()
    meter.update([{**engine, "requests_served": 1}], at=0)
    snapshot = Snapshot([engine], meter.update([engine], at=2),
                        [QueueView("m1", {0: 0}, 1, 1), QueueView("m2", {0: 2, 9: 1}, 0, 0)],
                        time.time())
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(snapshot, note="test"))
    text = console.export_text()
    row = next(line for line in text.splitlines() if " e1 " in line)
    assert [c.strip() for c in row.split("│")[1:-1]] == [
        "e1", "h", "m1", "ready", "2", "2", "-", "4.0", "0.0", "9", "-", "1h02m"]
    assert re.search(r"m2\W+3\W+0:2 9:1\W+0/0\W+no engine takes these tasks", text)


@pytest.fixture(scope="module")
def top_fleet(fleet_env: dict[str, str], app: Any, redis_client: Any,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A worker on the fake engine that served a few tasks, and three tasks (two at the
    default priority, step 3, one at priority step 9) waiting for a model no engine serves."""
    from producer import generate

    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("top-logs"))
    fleet.wait_ready(app, fleet.start(MODEL, ENGINE))
    for i in range(5):
        assert generate.delay(f"hello top {i}", model=MODEL, max_tokens=3).get(timeout=30)
    generate.delay("waits", model=STRANDED)
    generate.delay("waits too", model=STRANDED)
    generate.apply_async(kwargs={"prompt": "waits last", "model": STRANDED}, priority=9)
    yield fleet
    fleet.stop_all()
    redis_client.delete(*redis_client.keys(f"fleet.model.{STRANDED}*"),
                        f"fleet.wake.fleet.model.{STRANDED}")


def _fleet_top(env: dict[str, str], *args: str) -> tuple[int, int]:
    """``fleet top`` in a new pseudo-terminal (its controlling terminal); (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else of pytest runs here
        os.execve(sys.executable, [sys.executable, "-m", "producer.cli", "top", *args],
                  {**env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "120"})
    return pid, fd


def _read_until(fd: int, pattern: re.Pattern[str], timeout: float) -> str:
    """The terminal's text (escape sequences removed) once ``pattern`` is in it."""
    deadline, raw = time.monotonic() + timeout, b""
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                raw += os.read(fd, 65536)
            except OSError:  # the child exited: nothing more will come
                break
            text = ANSI.sub("", raw.decode(errors="replace"))
            if pattern.search(text):
                return text
    raise AssertionError(f"no {pattern.pattern!r} within {timeout}s; the terminal showed:\n"
                         f"{ANSI.sub('', raw.decode(errors='replace'))[-3000:]}")


def _exit_status(pid: int, fd: int, timeout: float) -> int | None:
    """The exit status once the child exits (draining its output meanwhile), None if it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([fd], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):  # EIO once the child has exited
                os.read(fd, 65536)
    return None


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_in_a_terminal_shows_engine_and_queue_and_quits(
        top_fleet: Fleet, fleet_env: dict[str, str], key: bytes) -> None:
    pid, fd = _fleet_top(fleet_env, "--interval", "0.5")
    code = None
    try:
        before = termios.tcgetattr(fd)
        shown = re.compile(rf"{ENGINE}\W+test\W+{MODEL}\W+ready.*{STRANDED}\W+3\W+3:2 9:1\W+0/0"
                           r"\W+no engine takes these tasks", re.S)
        _read_until(fd, shown, timeout=60)
        sent = time.monotonic()
        os.write(fd, key)
        code = _exit_status(pid, fd, timeout=10)
        took = time.monotonic() - sent
        assert code == 0, f"fleet top exited {code}"
        assert took < 3, f"fleet top took {took:.1f}s to quit"
        # The pseudo-terminal's modes are the slave's: cbreak is undone.
        assert termios.tcgetattr(fd)[3] == before[3]
        print(f"quit on {key!r} in {took:.2f}s")
    finally:
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_top_without_a_terminal_prints_one_snapshot_with_rates(
        top_fleet: Fleet, fleet_env: dict[str, str]) -> None:
    from producer import generate

    stop = threading.Event()

    def load() -> None:  # tasks all along the two polls, so the rate is above 0
        while not stop.is_set():
            generate.delay("busy top", model=MODEL, max_tokens=2).get(timeout=30)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "producer.cli", "top", "--interval", "1"],
                             env={**fleet_env, "COLUMNS": "200"}, capture_output=True,
                             text=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        stop.set()
        sender.join()
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout  # no escape sequences in a pipe
    row = next(line for line in out.stdout.splitlines() if f" {ENGINE} " in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[:4] == [ENGINE, "test", MODEL, "ready"]
    assert float(cells[7]) > 0, row  # requests/s
    assert re.search(rf"{STRANDED}\W+3\W+3:2 9:1\W+0/0", out.stdout), out.stdout
    print(f"fleet top (not a terminal) printed in {took:.1f}s")


def test_top_for_one_model_shows_only_its_engines_and_queue(
        top_fleet: Fleet, fleet_env: dict[str, str]) -> None:
    def top(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", "top", "--once",
                               "--interval", "0.1", *args], env={**fleet_env, "COLUMNS": "200"},
                              capture_output=True, text=True, timeout=60)

    stranded = top("--model", STRANDED)
    assert stranded.returncode == 0, stranded.stderr
    assert "no engine answered" in stranded.stdout and ENGINE not in stranded.stdout
    queues = [line for line in stranded.stdout.splitlines() if line.startswith("│")]
    assert len(queues) == 2 and re.search(rf"{STRANDED}\W+3\W", queues[1]), stranded.stdout
    bad = top("--model", "not a model")
    assert bad.returncode == 2 and "--model" in bad.stderr


def test_fleet_engines_shows_what_waits_per_priority() -> None:
    from producer.cli import engine_cell

    engine = {"engine_id": "e1", "priorities": {"0": {"running": 1, "waiting": 0},
                                                "9": {"running": 255, "waiting": 3904}},
              "queued_by_priority": {"3": 2, "9": 3000}}
    assert engine_cell(engine, "waiting_by_priority") == "9:3904"
    assert engine_cell(engine, "queued_by_priority") == "3:2 9:3000"
    assert engine_cell({"engine_id": "e2"}, "waiting_by_priority") == ""
    assert engine_cell(engine, "engine_id") == "e1"
