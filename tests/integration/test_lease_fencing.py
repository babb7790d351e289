"""A worker that loses its lease mid-upload (the control database down longer than the lease) stops writing
and aborts its upload before another attempt could take the job; the redelivered attempt then commits
exactly one backup, whose objects are its own, and that verifies and restores."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import build_settings, restore_and_query, run_cli, start_deskvault, wait_for, worker_context

from deskvault_core.config import load_settings
from messages.events import BackupDue
from producers.publisher import Publisher
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.ledger.ledger import Ledger, LedgerError
from workers.repository import catalog

pytestmark = pytest.mark.integration

LEASE_SECONDS = 3
PATIENT = (30, 500, 5000)  # retries that outlast the control database's outage
THROTTLE = "full_max_rate_mib = 4\n"  # the big cluster's 100 MiB full takes about 25 s


@pytest.fixture
def control_db(scratch_dir: Path):
    """A control database on a PostgreSQL of the test's own, so that stopping it disturbs nobody."""
    cluster = PgCluster(scratch_dir / f"control-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    yield cluster
    cluster.destroy()


def _done(ledger: Ledger, key: str):
    try:
        job = ledger.job(key)
    except LedgerError:
        return None  # this test's own connection, dropped by the restart
    return job if job is not None and job.state == "done" else None


def test_a_worker_that_loses_its_lease_mid_upload_stops_and_the_redelivery_commits_one_good_backup(
    big_cluster, control_db: PgCluster, scratch_dir: Path, tmp_path: Path, key_file: Path, request
) -> None:
    odbc = (
        f"DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT={control_db.port};"
        "DATABASE=postgres;UID=postgres;"
    )
    plain = build_settings(
        tmp_path,
        key_file,
        request.getfixturevalue("s3_endpoint"),
        request.getfixturevalue("rabbit_url"),
        odbc,
        big_cluster,
        lease_seconds=LEASE_SECONDS,
        retries=PATIENT,
    )
    throttled = Path(plain.source).with_suffix(".throttled.toml")
    throttled.write_text(
        Path(plain.source).read_text().replace("[targets.main]\n", "[targets.main]\n" + THROTTLE)
    )
    settings = load_settings(throttled, env={})
    ctx = worker_context(settings)
    store = ctx.repository.store
    event = BackupDue.new(
        target="main",
        kind="full",
        slot=datetime.now(UTC).replace(microsecond=0),
        idempotency_key=f"fence-{uuid.uuid4().hex}",
    )
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)

    log = tmp_path / "worker.log"
    worker = start_deskvault(settings, log, "worker", "--pool", "backup", "--threads", "1", "--no-metrics")
    try:
        # Given a worker in the middle of a throttled full's upload
        wait_for(
            lambda: store.multipart_uploads("targets/main/backups/"), timeout=120, what=f"the upload ({log})"
        )
        # When the control database goes away for longer than the lease
        control_db.stop()
        stopped = time.monotonic()
        # Then the worker stops writing and aborts its upload before the lease could run out in the ledger
        wait_for(
            lambda: not store.multipart_uploads("targets/main/backups/"),
            timeout=LEASE_SECONDS * 2,
            what=f"the worker to abort its upload after losing its lease ({log})",
        )
        assert time.monotonic() - stopped < LEASE_SECONDS + 1
        time.sleep(LEASE_SECONDS + 2)
        assert catalog.list_manifests(ctx.repository, "main") == []
        control_db.start()

        # When the event is redelivered once the database is back, then the job is done, once
        job = wait_for(
            lambda: _done(ctx.ledger, event.idempotency_key),
            timeout=300,
            what=f"the redelivered full to finish ({log})",
        )
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    said = log.read_text()
    assert "lease not renewed" in said, said[-3000:]
    assert job.attempts >= 2, job

    # Then exactly one backup is committed, it owns every data object under it, and no upload is left
    (manifest,) = catalog.list_manifests(ctx.repository, "main")
    backup_keys = set(ctx.repository.list_keys(catalog.backup_prefix("main", manifest["backup_id"])))
    assert backup_keys == catalog.referenced_keys(manifest) | {
        catalog.manifest_key("main", manifest["backup_id"])
    }
    assert store.multipart_uploads("targets/main/") == []
    # and it verifies and restores
    verify = run_cli(settings, "backups", "verify", "--target", "main")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    into = scratch_dir / f"fenced-{uuid.uuid4().hex[:6]}"
    assert restore_and_query(settings, into, "SELECT count(*) FROM blobs") == "50000"
