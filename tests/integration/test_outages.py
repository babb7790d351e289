"""Outages of what deskvault depends on, with real services: the object store stopped for 30 s in the
middle of a backup's upload, and the target database down when its backup is due."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import (
    alert_expression,
    free_port,
    prom_query,
    run_cli,
    start_deskvault,
    start_prometheus,
    wait_for,
    worker_context,
)

from messages.events import BackupDue
from producers.publisher import Publisher
from workers.engines.postgresql.cluster import PgCluster
from workers.repository import catalog

pytestmark = pytest.mark.integration

# Retries 0.5, 1, 2, 4 and then every 5 s (with jitter): 30 of them span a 30-90 s outage, and the
# first retry after it ends comes within seconds.
PATIENT = (30, 500, 5000)
OUTAGE_SECONDS = 30


def _worker(settings, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return start_deskvault(settings, log, "worker", "--pool", "backup", "--threads", "1", *extra)


def _publish_full(settings) -> BackupDue:
    event = BackupDue.new(
        target="main",
        kind="full",
        slot=datetime.now(UTC).replace(microsecond=0),
        idempotency_key=f"outage-{uuid.uuid4().hex}",
    )
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
    return event


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def test_the_object_store_down_for_30_s_mid_upload_then_the_backup_completes(
    make_settings, big_cluster, own_seaweedfs, tmp_path
) -> None:
    endpoint = own_seaweedfs.start()
    settings = make_settings(target=big_cluster, s3=endpoint, retries=PATIENT, lease_seconds=5)
    ctx = worker_context(settings)
    store = ctx.repository.store
    worker = _worker(settings, tmp_path / "worker.log", "--no-metrics")
    try:
        event = _publish_full(settings)
        # Given a backup in the middle of its multipart upload
        wait_for(lambda: store.multipart_uploads("targets/main/backups/"), timeout=120, what="the upload")
        # When the object store stops for 30 s
        own_seaweedfs.stop()
        stopped = time.monotonic()
        # Then the attempt fails cleanly (recorded in the ledger) while it is down
        wait_for(
            lambda: (job := ctx.ledger.job(event.idempotency_key)) and job.state == "failed" and job,
            timeout=OUTAGE_SECONDS + 60,
            what=f"the attempt to fail (see {tmp_path / 'worker.log'})",
        )
        assert catalog.manifest_key("main", catalog.backup_id_for("full", event.slot))
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
        own_seaweedfs.start()
        # And once it is back, a retry completes the backup: once, whole, with no upload left over
        job = wait_for(
            lambda: (j := ctx.ledger.job(event.idempotency_key)) and j.state == "done" and j,
            timeout=180,
            what=f"the backup to complete after the outage (see {tmp_path / 'worker.log'})",
        )
    finally:
        _stop(worker)
    assert job.attempts >= 2
    fulls = catalog.list_manifests(ctx.repository, "main")
    assert [m["backup_id"] for m in fulls] == [catalog.backup_id_for("full", event.slot)]
    assert store.multipart_uploads("targets/main/") == []
    verify = run_cli(settings, "backups", "verify", "--target", "main")
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.fixture
def small_cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    cluster = PgCluster(scratch_dir / f"outage-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    yield cluster
    cluster.destroy()


def test_the_database_down_when_its_backup_is_due_is_retried_and_the_rpo_alert_fires(
    make_settings, small_cluster: PgCluster, tmp_path: Path
) -> None:
    settings = make_settings(target=small_cluster, retries=PATIENT)
    ctx = worker_context(settings)
    worker_port, wal_port = free_port(), free_port()
    prometheus, prom_port = start_prometheus(tmp_path, worker_port, wal_port)
    processes = [
        prometheus,
        _worker(settings, tmp_path / "worker.log", "--metrics-port", str(worker_port)),
        start_deskvault(settings, tmp_path / "wal.log", "wal-stream", "--metrics-port", str(wal_port)),
    ]
    rpo_high = alert_expression("DeskvaultRPOHigh")
    failed = 'sum(deskvault_events_failed_total{pool="backup", type="backup-due"})'
    try:
        # Given the target's WAL streaming, and Prometheus seeing it
        wait_for(
            lambda: prom_query(prom_port, "deskvault_wal_archived_timestamp_seconds"),
            timeout=90,
            what=f"the WAL stream's metric in Prometheus (see {tmp_path})",
        )
        assert prom_query(prom_port, rpo_high) == []
        # When the database goes down and its backup falls due
        small_cluster.stop()
        event = _publish_full(settings)
        # Then the backup fails, is counted and retried with backoff rather than dead-lettered
        wait_for(
            lambda: (job := ctx.ledger.job(event.idempotency_key)) and job.attempts >= 3 and job,
            timeout=60,
            what="retries",
        )
        assert ctx.ledger.job(event.idempotency_key).state in ("failed", "running")
        wait_for(
            lambda: (r := prom_query(prom_port, failed)) and float(r[0]["value"][1]) >= 3, what="failures"
        )
        # And the RPO alert's expression fires once the WAL is a minute behind
        fired = wait_for(
            lambda: prom_query(prom_port, rpo_high), timeout=120, what="the RPO expression to fire"
        )
        assert fired[0]["metric"]["target"] == "main"
        # When the database is back, then the backup succeeds on a retry and the RPO recovers
        small_cluster.start()
        job = wait_for(
            lambda: (j := ctx.ledger.job(event.idempotency_key)) and j.state == "done" and j,
            timeout=120,
            what=f"the backup to succeed after the outage (see {tmp_path / 'worker.log'})",
        )
        assert job.outcome.startswith("full backup ")
        wait_for(lambda: not prom_query(prom_port, rpo_high), timeout=120, what="the RPO to recover")
    finally:
        for process in processes:
            _stop(process)
