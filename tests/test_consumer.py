"""The worker's consumer: task events buffered for a few ms and sent together (unit level,
on kombu's real event-loop hub; Flower's test sees the events of real tasks arrive)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer

from workers.consumer import EVENT_FLUSH_DELAY_S, Consumer


class Dispatcher:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self, errors: bool = True, groups: bool = True) -> None:
        self.flushes += 1


class StoppedClock(Timer):
    """Kombu's timer on a clock that moves only when the test moves it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def enter_after(self, secs: float, entry: Any, priority: int = 0, time: Any = None) -> Any:
        return super().enter_after(secs, entry, priority, time=lambda: self.now)

    def __iter__(self, *args: Any) -> Any:
        return super().__iter__(min, lambda: self.now)  # (min, nowfun)


@pytest.fixture
def consumer() -> Any:
    c = Consumer.__new__(Consumer)  # the flush logic only; no broker connection
    c.hub = Hub(timer=StoppedClock())
    c.event_dispatcher = Dispatcher()
    yield c
    c.hub.close()


def _run_ready(hub: Hub) -> None:
    for callback in hub._pop_ready():
        callback()


def test_events_buffered_together_leave_in_one_flush_after_the_delay(consumer: Any) -> None:
    hub, clock = consumer.hub, consumer.hub.timer
    start = clock.now
    consumer.on_send_event_buffered()  # task-received, on the loop's thread
    worker = threading.Thread(target=lambda: [consumer.on_send_event_buffered()
                                              for _ in range(2)])  # started, succeeded
    worker.start()
    worker.join()
    _run_ready(hub)
    assert len(hub.timer.queue) == 1  # one flush scheduled for all three
    hub.fire_timers()
    assert consumer.event_dispatcher.flushes == 0  # not yet due
    clock.now = start + EVENT_FLUSH_DELAY_S * 0.9
    hub.fire_timers()
    assert consumer.event_dispatcher.flushes == 0
    clock.now = start + EVENT_FLUSH_DELAY_S
    hub.fire_timers()
    assert consumer.event_dispatcher.flushes == 1

    consumer.on_send_event_buffered()  # an event after the flush schedules the next one
    _run_ready(hub)
    assert len(hub.timer.queue) == 1


def test_events_still_waiting_leave_at_shutdown(consumer: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("celery.worker.consumer.Consumer.shutdown", lambda self: None)
    consumer.on_send_event_buffered()
    consumer.shutdown()
    assert consumer.event_dispatcher.flushes == 1


def test_the_fleet_worker_uses_this_consumer(app: Any) -> None:
    import workers.app  # noqa: F401 - what `fleet worker` loads

    assert app.conf.worker_consumer == "workers.consumer:Consumer"
