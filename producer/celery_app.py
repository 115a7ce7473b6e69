"""The Celery app shared by producers and workers.

Configuration is applied lazily from :func:`producer.settings.get_settings`, so importing this
module reads no environment and opens no connection.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.settings import FleetSettings, get_settings


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """Celery settings of the fleet, derived from the fleet settings."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        # JSON only: a broker or backend writer must never get to run code in a worker or client.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # At-least-once: a task is acknowledged after it ran; if its worker dies, Redis hands it
        # to another one after the visibility timeout.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A threads-pool worker takes only as many tasks as it has threads: the rest stay on the
        # model queue for the other engines of that model.
        "worker_prefetch_multiplier": 1,
        "result_expires": settings.result_expires,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": "fleet.default",
    }


app = Celery("vllm_fleet")
app.add_defaults(lambda: celery_config(get_settings()))
