"""SIGTERM to a worker in the middle of a backup: the backup finishes or is redelivered, never lost."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from support import wait_for, worker_context

from messages.events import BackupDue
from producers.publisher import Publisher
from workers.repository import catalog

pytestmark = pytest.mark.integration


def worker_command(settings, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), "worker"]
    return [*command, "--pool", "backup", "--threads", "1", "--no-metrics", *extra]


def test_sigterm_mid_backup_loses_nothing_and_does_nothing_twice(make_settings) -> None:
    settings = make_settings(lease_seconds=5)
    ctx = worker_context(settings)
    slot = datetime.now(UTC).replace(microsecond=0)
    event = BackupDue.new(target="main", kind="full", slot=slot)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)

    first = subprocess.Popen(
        worker_command(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Given a worker that has claimed the backup and is running it
        wait_for(
            lambda: (job := ctx.ledger.job(event.idempotency_key)) is not None and job.state == "running",
            timeout=60,
            what="the backup to start",
        )
        # When it is told to stop
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output[-2000:]

    # Then the backup either finished during the graceful stop, or is redelivered to the next worker
    finished_in_shutdown = ctx.ledger.job(event.idempotency_key).state == "done"
    print(
        f"\nthe backup {'finished during the graceful stop' if finished_in_shutdown else 'was redelivered'}"
    )
    if not finished_in_shutdown:
        second = subprocess.run(
            worker_command(settings, "--burst"), capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    job = ctx.ledger.job(event.idempotency_key)
    assert job.state == "done" and job.outcome.startswith("full backup ")
    fulls = [m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] == "full"]
    assert [m["backup_id"] for m in fulls] == [catalog.backup_id_for("full", slot)]  # exactly one
