"""RabbitMQ restarted while 10,000 events are published and consumed: afterwards the ledger holds 10,000
distinct finished jobs, none lost and none done twice.

The broker application is stopped and started again (`rabbitmqctl stop_app` / `start_app`): every
client connection drops, and the durable quorum queues come back from disk. The publisher does what the
scheduler does: an event whose publish was not confirmed is published again (the next tick) -- so a
message may reach the queue twice, and the workers' ledger must make that one job.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import start_deskvault, wait_for, worker_context

from messages.events import BackupDue
from producers.publisher import Publisher, PublishError

pytestmark = pytest.mark.integration

EVENTS = 10_000
RESTART_AT = 3_000


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def test_a_broker_restart_mid_burst_loses_nothing_and_does_nothing_twice(make_settings, tmp_path) -> None:
    settings = make_settings(lease_seconds=10)
    ledger = worker_context(settings).ledger
    run = uuid.uuid4().hex[:12]
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    # Hourly log backups of a target with no full yet: each a real handler run, done in milliseconds.
    events = [
        BackupDue.new(
            target="main", kind="log", slot=now - timedelta(hours=i), idempotency_key=f"rst-{run}-{i}"
        )
        for i in range(EVENTS)
    ]
    worker_args = ("worker", "--pool", "backup", "--processes", "2", "--threads", "4", "--no-metrics")
    worker = start_deskvault(settings, tmp_path / "worker.log", "--log-level", "WARNING", *worker_args)
    restarted = threading.Event()
    republished = 0

    def restart() -> None:
        try:
            _rabbitmqctl("stop_app")
            time.sleep(2)
        finally:
            _rabbitmqctl("start_app")
            restarted.set()

    try:
        publisher = Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit)
        for i, event in enumerate(events):
            if i == RESTART_AT:
                threading.Thread(target=restart, daemon=True).start()
            deadline = time.monotonic() + 120
            while True:
                try:
                    publisher.publish(event)
                    break
                except PublishError:  # not confirmed: the broker is away; publish it again
                    assert time.monotonic() < deadline, "RabbitMQ did not come back within 2 minutes"
                    republished += 1
                    time.sleep(0.5)
        publisher.close()
        assert restarted.wait(120), "the restart did not finish"
        assert republished > 0, "no publish was interrupted: the restart missed the burst"

        # Then every event's job is done, exactly once each
        def all_done() -> bool:
            with ledger.transaction() as cur:
                row = cur.execute(
                    "SELECT COUNT(*), SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END) FROM dv_jobs"
                    " WHERE job_key LIKE ?",
                    f"rst-{run}-%",
                ).fetchone()
            return int(row[0]) == EVENTS and int(row[1] or 0) == EVENTS

        wait_for(all_done, timeout=600, what=f"{EVENTS} jobs done (see {tmp_path / 'worker.log'})")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    with ledger.transaction() as cur:
        outcomes = cur.execute(
            "SELECT outcome, MAX(attempts), COUNT(*) FROM dv_jobs WHERE job_key LIKE ? GROUP BY outcome",
            f"rst-{run}-%",
        ).fetchall()
    # One attempt each: a redelivered message found its job done and was skipped, never run again
    assert [(o, int(a), int(n)) for o, a, n in outcomes] == [
        ("not done: no full backup yet, so there is no chain for the WAL to extend", 1, EVENTS)
    ]
    print(f"\n{republished} publish attempts were interrupted by the restart and repeated")
