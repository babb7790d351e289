"""A full backup of a real PostgreSQL cluster in SeaweedFS, restored and started: same data, no plaintext."""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import free_port, raw_s3, worker_context

from deskvault.local.demo_data import TABLES, table_fingerprint_sql
from deskvault_core.config import Settings
from messages.events import BackupDue
from workers.engines.postgresql.basebackup import restore_full
from workers.engines.postgresql.cluster import PgCluster
from workers.handlers.backup import handle_backup_due
from workers.repository import catalog
from workers.repository.errors import IntegrityError

pytestmark = pytest.mark.integration

MARKER = "deskvault-plaintext-marker-7f3a9c"


def fingerprints(cluster: PgCluster, databases: tuple[str, ...]) -> dict[tuple[str, str], str]:
    return {(db, t): cluster.psql(table_fingerprint_sql(t), db).strip() for db in databases for t in TABLES}


@pytest.fixture(params=["files", "stream"])
def backed_up(make_settings, pg_target: PgCluster, request: pytest.FixtureRequest):
    """Given a target holding a marker row, when a full backup-due is handled, then this is the context.

    Once for each way of taking a full: from the data directory in parts, and through pg_basebackup."""
    pg_target.psql(
        f"INSERT INTO kb_articles VALUES (999999, '{MARKER}', '{MARKER}', true, now()) "
        "ON CONFLICT DO NOTHING",
        "acme",
    )
    settings: Settings = make_settings(target_options=f'full_method = "{request.param}"')
    ctx = worker_context(settings)
    event = BackupDue.new(
        target="main",
        kind="full",
        slot=datetime.now(UTC).replace(second=0, microsecond=0),
        idempotency_key=f"test-full-{uuid.uuid4().hex}",
    )
    outcome = handle_backup_due(ctx, event)
    return settings, ctx, event, outcome


def test_full_backup_restores_to_a_cluster_with_identical_tables(
    backed_up, pg_target: PgCluster, scratch_dir: Path, tmp_path: Path
) -> None:
    settings, ctx, event, outcome = backed_up
    assert outcome.startswith("full backup ")
    manifest = catalog.newest_full(ctx.repository, "main")
    assert manifest["kind"] == "full"
    assert manifest["start_lsn"] and manifest["stop_lsn"] and manifest["timeline"] == 1
    assert manifest["objects"][0]["sha256"] and manifest["stored_size"] > 0
    expected = fingerprints(pg_target, ("acme", "globex"))

    # When it is restored with the CLI and started on another port
    into = scratch_dir / f"restored-{event.event_id[:8]}"
    cli = subprocess.run(
        [
            ".venv/bin/deskvault",
            "--config",
            str(settings.source),
            "restore",
            "--target",
            "main",
            "--into",
            str(into),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert "restored and verified" in cli.stdout
    restored = PgCluster(into, free_port())
    restored.start()
    try:
        # Then every table of every tenant has the same rows
        assert fingerprints(restored, ("acme", "globex")) == expected
        assert restored.psql("SELECT title FROM kb_articles WHERE id = 999999", "acme").strip() == MARKER
    finally:
        restored.destroy()


def test_no_stored_object_contains_plaintext(backed_up) -> None:
    settings, _, _, _ = backed_up
    r = settings.repository
    s3 = raw_s3(settings)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=r.bucket, Prefix=r.prefix)
        for o in page.get("Contents", [])
    ]
    manifest = catalog.newest_full(worker_context(settings).repository, "main")
    data_keys = {r.prefix + o["key"] for o in manifest["objects"]}
    assert data_keys <= set(keys) and any(k.endswith("manifest.dv") for k in keys)
    for key in keys:
        data = s3.get_object(Bucket=r.bucket, Key=key)["Body"].read()
        assert MARKER.encode() not in data, key
        assert b"PG_VERSION" not in data and b"backup_label" not in data, key


def test_the_same_event_twice_gives_one_backup(backed_up) -> None:
    _, ctx, event, _ = backed_up
    second = handle_backup_due(ctx, event)
    assert second is None  # skipped as a duplicate
    assert len(catalog.list_manifests(ctx.repository, "main")) == 1
    assert ctx.ledger.job(event.idempotency_key).attempts == 1


def test_a_committed_backup_found_after_a_lost_ledger_record_is_not_redone(backed_up, make_settings) -> None:
    # Given the manifest exists but the ledger never heard (the worker died just after committing)
    _, ctx, event, _ = backed_up
    replay = BackupDue.new(
        target="main", kind="full", slot=event.slot, idempotency_key=event.idempotency_key + "-x"
    )
    outcome = handle_backup_due(ctx, replay)
    assert "found already committed" in outcome
    assert len(catalog.list_manifests(ctx.repository, "main")) == 1


def test_a_tampered_backup_is_refused_and_leaves_no_folder(backed_up, scratch_dir: Path) -> None:
    settings, ctx, _, _ = backed_up
    manifest = catalog.newest_full(ctx.repository, "main")
    r = settings.repository
    s3 = raw_s3(settings)
    key = r.prefix + max(manifest["objects"], key=lambda o: o["plain_size"])["key"]
    data = bytearray(s3.get_object(Bucket=r.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3.put_object(Bucket=r.bucket, Key=key, Body=bytes(data))

    into = scratch_dir / "tampered"
    with pytest.raises(IntegrityError):
        restore_full(ctx.repository, manifest, into)
    assert not into.exists()
