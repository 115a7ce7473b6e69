"""The Celery app shared by producers and workers.

Configuration is applied lazily from :func:`producer.settings.get_settings`, so importing this
module reads no environment and opens no connection.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP as CeleryAMQP

from producer.settings import FleetSettings, get_settings


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """Celery settings of the fleet, derived from the fleet settings."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Workers sweep for the tasks of dead workers this often, scanning on every sweep
        # (kombu's default scans every 10th of 10 s ticks), so recovery takes about
        # visibility_timeout plus one sweep.
        "unacked_restore_interval": restore_interval(settings.visibility_timeout),
        "unacked_restore_throttle": 1,
        # A sweep holds a Redis lock so that two workers do not sweep at once. A worker killed
        # inside its sweep leaves the lock until it expires, and until then no worker sweeps:
        # kombu's 300 s would hold every dead worker's tasks that long. Sweeps take
        # milliseconds and each message's restore is a transaction of its own (WATCH), so two
        # sweeps overlapping after a short expiry only repeat a look.
        "unacked_mutex_expire": sweep_lock_expiry(settings.visibility_timeout),
    }
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        # Kombu's Redis transport, refusing malformed messages instead of dying on them.
        "broker_transport": "producer.transport:Transport",
        # Celery's Redis result backend, one round trip per result (producer/backend.py).
        "result_backend": f"producer.backend:ResultBackend+{settings.backend_url}",
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        # JSON only: a broker or backend writer must never get to run code in a worker or client.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # At-least-once: a task is acknowledged after it ran; if its worker dies, Redis hands it
        # to another one after the visibility timeout (see workers/lease.py).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A threads-pool worker takes only as many tasks as it has threads: the rest stay on the
        # model queue for the other engines of that model.
        "worker_prefetch_multiplier": 1,
        "result_expires": settings.result_expires,
        "broker_connection_retry_on_startup": True,
        # Workers reconnect to a restarted Redis for as long as it takes.
        "broker_connection_max_retries": None,
        # A producer retries a publish for about 3 s, then raises kombu's OperationalError.
        "task_publish_retry_policy": {"max_retries": 6, "interval_start": 0.1,
                                      "interval_step": 0.5, "interval_max": 1.0},
        # A worker whose result write meets a Redis restart retries instead of losing the
        # result (and so the task, which it acknowledges right after).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        "result_backend_max_sleep_between_retries_ms": 2_000,
        "worker_hijack_root_logger": False,
        "task_default_queue": "fleet.default",
    }
    if settings.signing_key or settings.signing_certificate or settings.signing_cert_store:
        config.update(_signing(settings))
    # rediss:// without ssl_* query parameters: verify the server's certificate against the
    # system's CAs (kombu and Celery would otherwise default to not verifying it at all).
    if _tls_without_options(settings.broker_url):
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if _tls_without_options(settings.backend_url):
        config["redis_backend_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def _signing(settings: FleetSettings) -> dict[str, Any]:
    """Celery's message signing: every task and control message signed, unsigned ones refused.

    Registers the ``auth`` serializer with this process's key (what ``app.setup_security()``
    does, without re-reading the app's configuration while it is being built).
    """
    key, cert, store = (settings.signing_key, settings.signing_certificate,
                        settings.signing_cert_store)
    if not (key and cert and store):
        raise ValueError("message signing needs FLEET_SIGNING_KEY, FLEET_SIGNING_CERTIFICATE "
                         "and FLEET_SIGNING_CERT_STORE together")
    from celery.security.serialization import register_auth

    register_auth(key.read_text(), None, cert.read_text(), str(store / "*"), "sha256", "json")
    return {"task_serializer": "auth", "accept_content": ["auth"],
            "security_key": str(key), "security_certificate": str(cert),
            "security_cert_store": str(store / "*"), "security_digest": "sha256"}


def _tls_without_options(url: str) -> bool:
    return url.startswith("rediss://") and "ssl_cert_reqs" not in url


def restore_interval(visibility_timeout: int) -> int:
    """Seconds between two sweeps for the unacknowledged tasks of dead workers."""
    return max(1, min(10, visibility_timeout // 4))


def sweep_lock_expiry(visibility_timeout: int) -> int:
    """Seconds the sweep's lock outlives a worker killed while holding it."""
    return 3 * restore_interval(visibility_timeout) + 2


class AMQP(CeleryAMQP):
    """Celery's messaging layer, with connections named by their URL's scheme (see
    :class:`producer.transport.Connection`)."""

    @property
    def Connection(self) -> type:
        # Imported on first use: the transport's imports would add a tenth of the producer's
        # import time, and a process that never connects never needs them.
        from producer.transport import Connection

        return Connection


app = Celery("vllm_fleet", amqp=AMQP)
app.add_defaults(lambda: celery_config(get_settings()))
