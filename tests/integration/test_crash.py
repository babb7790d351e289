"""SIGKILL to a worker in the middle of a backup's multipart upload: nothing half-written is ever listed or
restorable, the redelivered event completes the backup once, and the abandoned upload is aborted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime

import pytest
from support import deskvault_command, run_cli, wait_for, worker_context

from deskvault_core.errors import DeskvaultError
from messages.events import BackupDue
from producers.publisher import Publisher
from workers.engines.postgresql.restore import plan_restore
from workers.repository import catalog

pytestmark = pytest.mark.integration

LEASE_SECONDS = 3


def _worker(settings, *extra: str) -> list[str]:
    return deskvault_command(settings, "worker", "--pool", "backup", "--threads", "1", "--no-metrics", *extra)


def test_sigkill_mid_upload_then_redelivery_backs_up_once(make_settings, big_cluster, tmp_path) -> None:
    settings = make_settings(target=big_cluster, lease_seconds=LEASE_SECONDS)
    ctx = worker_context(settings)
    store = ctx.repository.store
    event = BackupDue.new(
        target="main",
        kind="full",
        slot=datetime.now(UTC).replace(microsecond=0),
        idempotency_key=f"crash-{uuid.uuid4().hex}",  # the control database is shared by the session
    )
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)

    # Given a worker in the middle of the base backup's multipart upload
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_worker(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(
            lambda: store.multipart_uploads("targets/main/backups/"),
            timeout=120,
            what=f"the multipart upload to start (see {tmp_path / 'first.log'})",
        )
    finally:
        # When the worker, its processes and its pg_basebackup are killed outright
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)

    # Then the temporary slot that held the backup's WAL went with the dead worker's session
    wait_for(
        lambda: big_cluster.psql("SELECT count(*) FROM pg_replication_slots").strip() == "0" or None,
        timeout=30,
        what="the dead worker's replication slot to be dropped",
    )
    # Then nothing of the backup is listed or restorable, though its upload is left unfinished
    assert catalog.list_manifests(ctx.repository, "main") == []
    listed = run_cli(settings, "backups", "list", "--target", "main", "--json")
    assert listed.returncode == 0, listed.stderr
    listing = json.loads(listed.stdout)
    assert listing["backups"] == [] and listing["restorable_window"] is None
    with pytest.raises(DeskvaultError):
        plan_restore(ctx.repository, "main", None)
    abandoned = store.multipart_uploads("targets/main/backups/")
    assert abandoned, "the kill came too late: no upload was left unfinished"
    job = ctx.ledger.job(event.idempotency_key)
    assert job.state == "running"  # claimed by the dead worker, its lease running out

    # When RabbitMQ redelivers the event to a new worker, once the dead worker's lease has run out
    time.sleep(LEASE_SECONDS + 1)
    second = subprocess.run(_worker(settings, "--burst"), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    # Then the backup is done once, by the second attempt, and restorable; no upload is left behind
    job = ctx.ledger.job(event.idempotency_key)
    assert job.state == "done" and job.attempts == 2, job
    fulls = catalog.list_manifests(ctx.repository, "main")
    assert [m["backup_id"] for m in fulls] == [catalog.backup_id_for("full", event.slot)]
    assert store.multipart_uploads("targets/main/") == []
    # (one per part that was in flight: a full in parts uploads several at once)
    said = second.stdout + second.stderr
    aborted = re.search(r"aborted (\d+) upload\(s\) left by an earlier attempt", said)
    assert aborted and int(aborted.group(1)) == len(abandoned), said[-3000:]
    verify = run_cli(settings, "backups", "verify", "--target", "main")
    assert verify.returncode == 0, verify.stdout + verify.stderr
