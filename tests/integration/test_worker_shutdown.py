"""SIGTERM to a worker in the middle of a backup: the backup finishes or is redelivered, never lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import tenants_cluster, wait_for, worker_context

from messages.events import BackupDue
from producers.publisher import Publisher
from workers.engines.postgresql.cluster import PgCluster
from workers.repository import catalog

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_target(scratch_dir: Path) -> Iterator[PgCluster]:
    """A fresh cluster of these tests' own: a throttled full of it takes a known few seconds (the
    session's target grows with every test before these)."""
    cluster = tenants_cluster(scratch_dir, "shutdown", ())
    yield cluster
    cluster.destroy()


def worker_command(settings, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), "worker"]
    return [*command, "--pool", "backup", "--threads", "1", "--no-metrics", *extra]


def stopped_mid_backup(settings, event: BackupDue, *extra: str) -> str:
    """Publish `event`, start a backup worker (with `extra` options), SIGTERM it once the backup runs,
    and return what it printed; it must exit 0."""
    ctx = worker_context(settings)
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
    worker = subprocess.Popen(
        worker_command(settings, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(
            lambda: (job := ctx.ledger.job(event.idempotency_key)) is not None and job.state == "running",
            timeout=60,
            what="the backup to start",
        )
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, output[-2000:]
    return output


def test_sigterm_mid_backup_loses_nothing_and_does_nothing_twice(make_settings) -> None:
    # Given a worker that has claimed a backup and is running it, when it is told to stop
    settings = make_settings(lease_seconds=5)
    ctx = worker_context(settings)
    slot = datetime.now(UTC).replace(microsecond=0)
    event = BackupDue.new(target="main", kind="full", slot=slot)
    stopped_mid_backup(settings, event)

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


@pytest.mark.parametrize(("stop_timeout", "finishes"), [(600, True), (1, False)], ids=["long", "short"])
def test_the_stop_timeout_decides_whether_a_running_backup_finishes_or_goes_back(
    make_settings, small_target: PgCluster, stop_timeout: int, finishes: bool
) -> None:
    # Given a worker running a full backup that takes several seconds (a small cluster read at 4 MiB/s)
    throttled = 'full_method = "stream"\nfull_max_rate_mib = 4'
    settings = make_settings(lease_seconds=5, target=small_target, target_options=throttled)
    ctx = worker_context(settings)
    slot = datetime.now(UTC).replace(microsecond=0)
    event = BackupDue.new(target="main", kind="full", slot=slot, idempotency_key=f"stop-{uuid.uuid4().hex}")
    # When it is told to stop (as a scale-down does)
    output = stopped_mid_backup(settings, event, "--stop-timeout", str(stop_timeout))
    job = ctx.ledger.job(event.idempotency_key)
    if finishes:
        # Then with time enough, it exited only after the backup was done
        assert job.state == "done" and job.outcome.startswith("full backup "), output[-2000:]
    else:
        # Then with too little, the backup went back to the queue, and the next worker takes it once the
        # cut-short attempt's lease has run out
        assert job.state != "done", output[-2000:]
        lease_ends = job.updated_at + timedelta(seconds=settings.control_db.lease_seconds)  # its last renewal
        wait_for(lambda: ctx.ledger.now() > lease_ends, timeout=30, what="the old lease to run out")
        second = subprocess.run(
            worker_command(settings, "--burst"), capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        assert ctx.ledger.job(event.idempotency_key).state == "done"
