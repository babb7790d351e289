"""Benchmark: emitting the due events of 100,000 tenants, and the per-event cost of handling one.

1. Publish rate. The accounts table of a private control database holds N tenants entitled to
   downloadable backups. The scheduler's tick requests the nightly export of each: it reads the tenants
   (accounts query through ODBC), checks what it already emitted, publishes each event with a publisher
   confirm and records the slot in the ledger. Baseline, in the same run: raw pika publishing the same
   number of messages of the same size with confirms to the same quorum queue. Ratio = deskvault's rate
   / raw rate (goal >= 0.5).
2. Handling overhead: what a worker adds around a handler that does nothing -- decoding the event, the
   ledger's claim and completion, and the metrics middleware's hooks -- timed per event, p50 and p99.

Run: .venv/bin/python bench/publish_load.py [--tenants 100000] [--handled 5000]
Progress goes to stderr, the result (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pika
from common import ROOT, BenchServices, log, system_psql

sys.path.insert(0, str(ROOT))

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from messages.envelope import wrap
from messages.events import ExportRequested, decode_event
from producers.publisher import Publisher
from producers.scheduler import Scheduler
from workers.context import open_ledger
from workers.jobs import run_once
from workers.metrics import PoolMetrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--handled", type=int, default=5_000, help="events for the handling overhead")
    args = parser.parse_args()
    with BenchServices("load") as services, tempfile.TemporaryDirectory() as scratch:
        log(f"creating {args.tenants} entitled tenants in the accounts table")
        system_psql(
            "CREATE TABLE accounts AS SELECT 't' || g AS id, 'company' AS plan, true AS downloadable_backups,"
            f" 'db' || g AS database_name, 'main' AS target FROM generate_series(1, {args.tenants}) g",
            database=services.control_db,
        )
        odbc = (
            "DRIVER={PostgreSQL Unicode};SERVER=127.0.0.1;PORT=5432;"
            f"DATABASE={services.control_db};UID=postgres;"
        )
        settings = services.settings(
            Path(scratch),
            target="main",
            conninfo="host=127.0.0.1 port=1 user=postgres",
            prefix="load",
            extra=f'[lifecycle]\naccounts_odbc = "{odbc}"\n',
        )
        ledger = open_ledger(settings)
        ledger.migrate()
        now = datetime.now(UTC)
        slot_event = ExportRequested.new(
            tenant="t1",
            request_id="scheduled-20261202T0230Z",
            requested_by="deskvault scheduler",
            kind="scheduled",
        )

        with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
            publisher._open()  # declares the topology
            raw_rate = _raw_publish_rate(settings.broker.url, wrap(slot_event), args.tenants)
            log(f"raw pika with confirms: {raw_rate:.0f} messages/s")
            _purge(settings.broker.url)
            scheduler = Scheduler(settings, ledger, publisher, clock=lambda: now)
            started = time.perf_counter()
            published = scheduler.tick()
            seconds = time.perf_counter() - started
        exports = sum(1 for e in published if e.type == "export-requested")
        assert exports == args.tenants, f"the tick published {exports} exports, expected {args.tenants}"
        rate = exports / seconds
        log(f"scheduler tick: {exports} events in {seconds:.1f} s = {rate:.0f}/s")
        _purge(settings.broker.url)

        overhead = _handling_overhead(settings, ledger, args.handled)
        log(f"handling overhead: p50 {overhead['p50_ms']:.2f} ms, p99 {overhead['p99_ms']:.2f} ms")
    result = {
        "tenants": args.tenants,
        "raw_pika_confirmed_per_second": round(raw_rate),
        "scheduler_confirmed_per_second": round(rate),
        "ratio_to_raw": round(rate / raw_rate, 3),
        "goal_ratio": 0.5,
        "handling_overhead": overhead,
    }
    print(json.dumps(result, indent=2))
    return 0


def _raw_publish_rate(url: str, body: bytes, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    started = time.perf_counter()
    for _ in range(count):
        channel.basic_publish("", "export", body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    seconds = time.perf_counter() - started
    connection.close()
    return count / seconds


def _purge(url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_purge("export")
    connection.close()


def _handling_overhead(settings, ledger, count: int) -> dict[str, float]:
    """decode + claim + complete + metrics hooks around a no-op body, per event."""
    from workers.context import WorkerContext

    ctx = WorkerContext(settings=settings, ledger=ledger, repository=None)  # type: ignore[arg-type]
    hooks = PoolMetrics()
    times = []
    for i in range(count):
        event = ExportRequested.new(tenant=f"t{i}", request_id=f"r{i}", requested_by="bench")
        payload = json.loads(json.dumps(event.to_dict()))
        message = MessageProxy(
            Message(
                queue_name="export",
                actor_name="export_requested",
                args=(payload,),
                kwargs={},
                options={},
                message_timestamp=int(time.time() * 1000),
            )
        )
        started = time.perf_counter()
        hooks.before_process_message(None, message)
        decoded = decode_event(payload)
        run_once(ctx, decoded, lambda: "no-op")
        hooks.after_process_message(None, message, result=None)
        times.append(time.perf_counter() - started)
        if (i + 1) % 1000 == 0:
            log(f"handled {i + 1}/{count}")
    times.sort()
    return {
        "events": count,
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
