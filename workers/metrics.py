"""Prometheus metrics of the worker pools, correct across a pool's worker processes.

`deskvault worker` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before any worker process starts,
so every process writes its samples there and the parent serves their sum on one port.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import dramatiq
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from deskvault_core.build_info import BuildInfo
from messages.topology import EVENT_POOL, actor_name

_EVENT_TYPE_OF_ACTOR = {actor_name(t): t for t in EVENT_POOL}

# Backups run from seconds to hours; events should wait milliseconds, seconds when a pool lags.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

EVENTS_HANDLED = Counter("deskvault_events_handled_total", "Events handled successfully", ["pool", "type"])
EVENTS_FAILED = Counter("deskvault_events_failed_total", "Handler attempts that raised", ["pool", "type"])
EVENTS_RETRIED = Counter(
    "deskvault_events_retried_total",
    "Handler attempts sent back for a later retry (failures within the limit, and waits for a busy job)",
    ["pool", "type"],
)
EVENTS_DUPLICATE = Counter(
    "deskvault_events_duplicate_total", "Events skipped because their job was already done", ["pool", "type"]
)
EVENTS_DEAD_LETTERED = Counter(
    "deskvault_events_dead_lettered_total", "Messages moved to the dead-letter queue", ["pool", "type"]
)
HANDLER_SECONDS = Histogram(
    "deskvault_handler_duration_seconds", "Time a handler ran", ["pool", "type"], buckets=DURATION_BUCKETS
)
WAIT_SECONDS = Histogram(
    "deskvault_event_wait_seconds",
    "Time from enqueue (or the end of an intended retry delay) to the start of handling",
    ["pool", "type"],
    buckets=WAIT_BUCKETS,
)
STARTED_READY = Gauge(
    "deskvault_event_started_ready_timestamp_seconds",
    "When the newest event a worker started became ready (sent, or its retry delay ended)",
    ["pool"],
    multiprocess_mode="max",
)
BACKUP_BYTES = Counter("deskvault_backup_bytes_total", "Plaintext bytes backed up", ["target", "kind"])
RETENTION_STOPPED = Counter(
    "deskvault_retention_stopped_total",
    "Retention runs that deleted nothing because a manifest could not be read or the bucket failed",
    ["target"],
)


def event_type_of(actor: str) -> str:
    return _EVENT_TYPE_OF_ACTOR.get(actor, "unknown")


def pool_of(queue_name: str) -> str:
    return queue_name.removesuffix(".DQ").removesuffix(".XQ")


class PoolMetrics(dramatiq.Middleware):
    """Counts, waits and durations per pool and event type; also how many messages are in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # delivery (its proxy object, since a message id can arrive twice) -> monotonic start time; a
        # message skipped before this hook ran is simply absent.
        self._started: dict[int, float] = {}

    @property
    def in_progress(self) -> int:
        with self._lock:
            return len(self._started)

    def before_process_message(self, broker: Any, message: Any) -> None:
        labels = (pool_of(message.queue_name), event_type_of(message.actor_name))
        now_ms = time.time() * 1000
        # A retry's wait starts when its backoff ends, not when the event was first sent.
        ready_ms = message.options.get("eta", message.message_timestamp)
        WAIT_SECONDS.labels(*labels).observe(max(0.0, (now_ms - ready_ms) / 1000))
        STARTED_READY.labels(labels[0]).set(ready_ms / 1000)
        with self._lock:
            self._started[id(message)] = time.monotonic()

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        labels = (pool_of(message.queue_name), event_type_of(message.actor_name))
        with self._lock:
            started = self._started.pop(id(message), None)
        if started is not None:
            HANDLER_SECONDS.labels(*labels).observe(time.monotonic() - started)
        if exception is None:
            EVENTS_HANDLED.labels(*labels).inc()
            return
        if not isinstance(exception, dramatiq.Retry):
            EVENTS_FAILED.labels(*labels).inc()
        # dramatiq's Retries middleware has marked a message failed for good by now (this middleware
        # comes first in the list, and after-hooks run in reverse); any other raise is retried later.
        if not message.failed:
            EVENTS_RETRIED.labels(*labels).inc()

    def after_skip_message(self, broker: Any, message: Any) -> None:
        with self._lock:
            self._started.pop(id(message), None)


def initialize(pools: tuple[str, ...], targets: list[str]) -> None:
    """Create every pool's and target's series at zero, so rates and alerts count a first event too."""
    for event_type, pool in EVENT_POOL.items():
        if pool not in pools:
            continue
        for metric in (
            EVENTS_HANDLED,
            EVENTS_FAILED,
            EVENTS_RETRIED,
            EVENTS_DUPLICATE,
            EVENTS_DEAD_LETTERED,
            WAIT_SECONDS,
            HANDLER_SECONDS,
        ):
            metric.labels(pool, event_type)
    if "verify" in pools:
        for target in targets:
            for outcome in ("passed", "failed"):
                DRILLS.labels(target, outcome)
    if "backup" in pools:
        for target in targets:
            RETENTION_STOPPED.labels(target)  # a zero to increase() from, so the alert has data


def serve_metrics(host: str, port: int) -> None:
    """Serve this process's own metrics (the default registry) and the build info."""
    REGISTRY.register(BuildInfo())
    start_http_server(port, addr=host)


def serve_multiprocess_metrics(host: str, port: int, *collectors: Any) -> None:
    """Serve every worker process's samples summed, and `collectors` (the parent of `deskvault worker`)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set before metrics are served")
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(BuildInfo())
    for collector in collectors:
        registry.register(collector)
    start_http_server(port, addr=host, registry=registry)


WAL_ARCHIVED = Gauge(
    "deskvault_wal_archived_timestamp_seconds",
    "Until when a target's WAL is safe in the repository (the live RPO is the time since)",
    ["target"],
    multiprocess_mode="max",
)
WAL_BEHIND = Gauge(
    "deskvault_wal_stream_behind_bytes",
    "WAL the server had flushed that the receiver did not hold yet, at the last upload round",
    ["target"],
    multiprocess_mode="max",
)
WAL_RECEIVER_EXITS = Counter(
    "deskvault_wal_receiver_exits_total", "Times a target's WAL receiver (pg_receivewal) exited", ["target"]
)
WAL_PROBLEM = Gauge(
    "deskvault_wal_stream_problem",
    "1, labelled with why, while a target's live RPO cannot move (`deskvault status` shows it too)",
    ["target", "problem"],
    multiprocess_mode="max",
)
DRILLS = Counter("deskvault_restore_drills_total", "Restore drills run, by outcome", ["target", "outcome"])
DRILL_SECONDS = Histogram(
    "deskvault_restore_drill_duration_seconds",
    "How long a restore drill took",
    ["target"],
    buckets=DURATION_BUCKETS,
)
