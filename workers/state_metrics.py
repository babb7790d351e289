"""Gauges read at scrape time from RabbitMQ and the ledger, served by the parent of `deskvault worker`.

They describe shared state (queues, backups, drills, accounts), not what one process did, so they are
right after a restart and the same from every host: dashboards take `max by` (or `min by` for the
queue age estimate) across instances.

RabbitMQ does not report the age of a quorum queue's oldest message (rabbitmq-server issue #6813), so
the age is estimated: while messages are ready it is the time since the newest event a worker started
became ready (everything still queued came after it), capped by how long this process has seen the
queue non-empty; it is 0 once the queue is empty.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pika
import pika.exceptions
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from deskvault_core.config import Settings
from workers.ledger.ledger import Ledger
from workers.queues import QueueDepth, queue_depths

log = logging.getLogger(__name__)

# Two Prometheus servers scraping the same worker share one reading of RabbitMQ and the ledger.
CACHE_SECONDS = 5.0


# name -> (help, labels): every gauge this collector can serve, so `describe` lists them without I/O.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "deskvault_state_source_up": ("Whether the last reading of a state source worked", ("source",)),
    "deskvault_queue_ready_messages": ("Events waiting in a pool's queue", ("pool",)),
    "deskvault_queue_consumers": ("Worker connections consuming a pool's queue", ("pool",)),
    "deskvault_queue_dead_letters": ("Messages in a pool's dead-letter queue", ("pool",)),
    "deskvault_queue_oldest_ready_age_seconds": (
        "Estimated age of the oldest event waiting in a pool's queue (0 when empty)",
        ("pool",),
    ),
    "deskvault_jobs_running": ("Jobs claimed and not finished, from the ledger", ("pool",)),
    "deskvault_exports_pending": ("Exports requested and not yet ready (queued or running)", ()),
    "deskvault_backup_last_success_timestamp_seconds": (
        "When the newest backup of a kind (full, diff, log) finished",
        ("target", "kind"),
    ),
    "deskvault_repository_stored_bytes": (
        "Bytes a target occupies in the repository (compressed, encrypted), by area",
        ("target", "area"),
    ),
    "deskvault_repository_objects": ("Objects a target has in the repository, by area", ("target", "area")),
    "deskvault_restore_verified_timestamp_seconds": (
        "When a restore drill last proved the target restorable",
        ("target",),
    ),
    "deskvault_restore_drill_last_timestamp_seconds": ("When the newest restore drill finished", ("target",)),
    "deskvault_restore_drill_last_passed": (
        "1 if the newest restore drill passed, 0 if it failed",
        ("target",),
    ),
    "deskvault_tenants_pending_purge": ("Expired tenants whose data is kept until a purge date", ()),
    "deskvault_tenants_on_legal_hold": ("Expired tenants whose purge a legal hold stops", ()),
    "deskvault_purges_due": ("Purges whose date has passed and that have not finished", ()),
    "deskvault_purge_overdue_seconds": (
        "How long past its date the oldest unfinished purge is (0 if none)",
        (),
    ),
}


def _gauge(name: str) -> GaugeMetricFamily:
    help_text, labels = GAUGES[name]
    return GaugeMetricFamily(name, help_text, labels=list(labels))


class StateCollector(Collector):
    """Queue depth and age for `pools`, and the ledger state those pools are responsible for."""

    def __init__(
        self,
        settings: Settings,
        pools: tuple[str, ...],
        ledger: Ledger,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._pools = pools
        self._ledger = ledger
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[GaugeMetricFamily]] | None = None
        self._nonempty_since: dict[str, float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= CACHE_SECONDS:
                self._cached = (now, self._read(now))
            families = self._cached[1]
        yield from families

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: registering the collector must not touch RabbitMQ or the ledger.
        return (_gauge(name) for name in GAUGES)

    # -- readings ---------------------------------------------------------------------------------------
    def _read(self, now: float) -> list[GaugeMetricFamily]:
        up = _gauge("deskvault_state_source_up")
        families = [up]
        queues = self._read_queues()
        up.add_metric(["rabbitmq"], 0 if queues is None else 1)
        if queues is not None:
            families += self._queue_families(queues, now)
        try:
            families += self._ledger_families(queues or {}, now)
            up.add_metric(["ledger"], 1)
        except Exception as e:  # any driver error: report the source down, never fail the scrape
            log.warning("metrics: could not read the ledger: %s", type(e).__name__)
            up.add_metric(["ledger"], 0)
        finally:
            self._ledger.close()  # each scrape runs on a new thread: keep no connection behind
        return families

    def _read_queues(self) -> dict[str, QueueDepth] | None:
        try:
            return queue_depths(self._settings.broker.url, self._pools)
        except (pika.exceptions.AMQPError, OSError) as e:
            log.warning("metrics: could not read RabbitMQ: %s", type(e).__name__)
            return None

    def _queue_families(self, queues: dict[str, QueueDepth], now: float) -> list[GaugeMetricFamily]:
        ready = _gauge("deskvault_queue_ready_messages")
        consumers = _gauge("deskvault_queue_consumers")
        dead = _gauge("deskvault_queue_dead_letters")
        age = _gauge("deskvault_queue_oldest_ready_age_seconds")
        started = _newest_started_ready()
        for pool, (n_ready, n_consumers, n_dead) in sorted(queues.items()):
            ready.add_metric([pool], n_ready)
            consumers.add_metric([pool], n_consumers)
            dead.add_metric([pool], n_dead)
            age.add_metric([pool], self._oldest_age(pool, n_ready, started.get(pool), now))
        return [ready, consumers, dead, age]

    def _oldest_age(self, pool: str, ready: int, newest_started: float | None, now: float) -> float:
        if ready == 0:
            self._nonempty_since.pop(pool, None)
            return 0.0
        since = self._nonempty_since.setdefault(pool, now)
        if newest_started is not None:
            since = max(since, newest_started)
        return max(0.0, now - since)

    def _ledger_families(self, queues: dict[str, QueueDepth], now: float) -> list[GaugeMetricFamily]:
        running = _gauge("deskvault_jobs_running")
        counts = self._ledger.running_jobs()
        for pool in self._pools:
            running.add_metric([pool], counts.get(pool, 0))
        families = [running]
        if "backup" in self._pools:
            families += self._backup_families()
        if "verify" in self._pools:
            families += self._drill_families()
        if "lifecycle" in self._pools:
            families += self._purge_families(now)
        if "export" in self._pools and "export" in queues:
            pending = _gauge("deskvault_exports_pending")
            pending.add_metric([], queues["export"].ready + counts.get("export", 0))
            families.append(pending)
        return families

    def _backup_families(self) -> list[GaugeMetricFamily]:
        targets = set(self._settings.targets)
        last = _gauge("deskvault_backup_last_success_timestamp_seconds")
        for (target, kind), finished in sorted(self._ledger.newest_backups().items()):
            if target in targets:
                last.add_metric([target, kind], finished.timestamp())
        stored = _gauge("deskvault_repository_stored_bytes")
        objects = _gauge("deskvault_repository_objects")
        for target, area, n_objects, n_bytes in self._ledger.repository_usage():
            if target in targets:
                stored.add_metric([target, area], n_bytes)
                objects.add_metric([target, area], n_objects)
        return [last, stored, objects]

    def _drill_families(self) -> list[GaugeMetricFamily]:
        verified = _gauge("deskvault_restore_verified_timestamp_seconds")
        last = _gauge("deskvault_restore_drill_last_timestamp_seconds")
        passed = _gauge("deskvault_restore_drill_last_passed")
        for target, drill in sorted(self._ledger.newest_drills().items()):
            if target not in self._settings.targets:
                continue
            last.add_metric([target], drill["finished_at"].timestamp())
            passed.add_metric([target], 1 if drill["succeeded"] else 0)
            if drill["passed_at"] is not None:
                verified.add_metric([target], drill["passed_at"].timestamp())
        return [verified, last, passed]

    def _purge_families(self, now: float) -> list[GaugeMetricFamily]:
        state = self._ledger.purge_state(datetime.fromtimestamp(now, UTC))
        families = []
        for name, key, help_text in (
            (
                "deskvault_tenants_pending_purge",
                "pending",
                "Expired tenants whose data is kept until a purge date",
            ),
            ("deskvault_tenants_on_legal_hold", "held", "Expired tenants whose purge a legal hold stops"),
            ("deskvault_purges_due", "due", "Purges whose date has passed and that have not finished"),
        ):
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], state[key])
            families.append(family)
        overdue = _gauge("deskvault_purge_overdue_seconds")
        oldest = state["oldest_due"]
        overdue.add_metric([], max(0.0, now - oldest.timestamp()) if oldest is not None else 0.0)
        families.append(overdue)
        return families


def _newest_started_ready() -> dict[str, float]:
    """pool -> the workers' `deskvault_event_started_ready_timestamp_seconds` (max over processes)."""
    found: dict[str, float] = {}
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory is None:
        return found  # not under `deskvault worker`: no worker process reports here
    # Only the max-mode gauge files: the registry already merges every file for this scrape.
    files = glob.glob(os.path.join(directory, "gauge_max_*.db"))
    for family in MultiProcessCollector.merge(files, accumulate=False):
        if family.name != "deskvault_event_started_ready_timestamp_seconds":
            continue
        for sample in family.samples:
            pool = sample.labels.get("pool", "")
            found[pool] = max(found.get(pool, 0.0), sample.value)
    return found


def state_collector(settings: Settings, pools: tuple[str, ...]) -> StateCollector:
    """The collector for the pools one `deskvault worker` runs, with its own ledger connection."""
    from workers.context import open_ledger

    return StateCollector(settings, pools, open_ledger(settings))
