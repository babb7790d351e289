"""Fulls and differentials read from the data directory, stored as parts and restored in parallel.

A cluster of its own (three tenant databases and one table large enough to be cut into slices, with
parts of 1 MiB): each database's files are stored in parts of its own, the full and the differential
restore to exactly the source's rows, a lost lease in any part's thread stops the whole backup, and a
crafted (validly encrypted) part cannot write outside the data directory.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import take_backup, tenants_cluster, wait_for, wal_streaming, worker_context

from deskvault.local.demo_data import TABLES, helpdesk_sql, table_fingerprint_sql
from workers.engines.postgresql import parts
from workers.engines.postgresql.basebackup import restore_full
from workers.engines.postgresql.cluster import PgCluster, free_port, hand_over, server_ids
from workers.engines.postgresql.datafiles import DataFile
from workers.engines.postgresql.restore import plan_restore, restore
from workers.engines.postgresql.targuard import UnsafeMember
from workers.engines.postgresql.untar import UnpackError
from workers.engines.registry import engine_for
from workers.repository import catalog, fencing
from workers.repository.errors import RepositoryError

pytestmark = pytest.mark.integration

TENANTS = ("t_alpha", "t_beta", "t_gamma")


@pytest.fixture(scope="module")
def cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    source = tenants_cluster(scratch_dir, "files", TENANTS)
    # About 6 MiB in one relation: cut into slices of 1 MiB below.
    source.psql(
        "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 7)::text) AS v"
        " FROM generate_series(1, 60000) g",
        "t_alpha",
    )
    source.psql("CHECKPOINT")
    yield source
    source.destroy()


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts, "PART_BYTES", 2**20)


def _fingerprints(cluster: PgCluster) -> dict[tuple[str, str], str]:
    found = {(db, t): cluster.psql(table_fingerprint_sql(t), db).strip() for db in TENANTS for t in TABLES}
    found[("t_alpha", "big")] = cluster.psql(
        "SELECT count(*) || ':' || sum(length(v)) FROM big", "t_alpha"
    ).strip()
    return found


def _oid(cluster: PgCluster, database: str) -> str:
    return cluster.psql(f"SELECT oid FROM pg_database WHERE datname = '{database}'").strip()


def test_a_full_stores_each_database_in_parts_of_its_own_and_restores_every_row(
    make_settings, cluster: PgCluster, scratch_dir: Path
) -> None:
    ctx = worker_context(make_settings(target=cluster))
    expected = _fingerprints(cluster)

    assert take_backup(ctx, "full").startswith("full backup ")

    manifest = catalog.newest_full(ctx.repository, "main")
    assert manifest["layout"] == "parts"
    groups = {o["group"] for o in manifest["objects"]}
    assert {f"base/{_oid(cluster, t)}" for t in TENANTS} <= groups and "cluster" in groups
    assert any("slice" in o for o in manifest["objects"]), "the 6 MiB relation was not cut into slices"
    # The file list says which part holds each file, and a database's files are only in its own parts
    by_name = {o["name"]: o for o in manifest["objects"]}
    header, *lines = b"".join(ctx.repository.get_stream(manifest["file_list"])).splitlines()
    assert json.loads(header) == {"format": 2}
    listed = [json.loads(line) for line in lines]
    assert [e[0] for e in listed] == sorted(e[0] for e in listed) and len(listed) == manifest["files"]
    for path, _size, _mtime, part in listed:
        assert parts.group_of(path) == by_name[part]["group"], path
    assert not any(e[0].startswith("pg_wal/") for e in listed)
    assert {o["name"] for o in manifest["objects"]} >= {"folders", "wal"}

    into = scratch_dir / f"restored-{uuid.uuid4().hex[:6]}"
    restore_full(ctx.repository, manifest, into, parallel=3)
    # Laid out for the server's user alone
    owner = server_ids()
    for root, dirs, files in os.walk(into):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0, os.path.join(root, name)
            if owner is not None:
                assert st.st_uid == owner[0], os.path.join(root, name)
    restored = PgCluster(into, free_port())
    restored.start()
    try:
        assert _fingerprints(restored) == expected
    finally:
        restored.destroy()


def test_a_differential_in_parts_over_a_full_in_parts_restores_the_latest_rows(
    make_settings, cluster: PgCluster, scratch_dir: Path
) -> None:
    ctx = worker_context(make_settings(target=cluster))
    with wal_streaming(ctx, connected=cluster):
        take_backup(ctx, "full")
        # Given changes in one tenant and a new database after the full
        cluster.psql("DELETE FROM replies WHERE id % 3 = 0", "t_beta")
        cluster.psql("INSERT INTO big SELECT g, 'late' FROM generate_series(1, 5000) g", "t_alpha")
        cluster.psql("CREATE DATABASE t_delta")
        cluster.psql(helpdesk_sql("t_delta"), "t_delta")
        cluster.psql("CHECKPOINT")
        assert take_backup(ctx, "diff").startswith("diff backup ")
        diff = [m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] == "diff"][-1]
        cluster.psql("SELECT pg_switch_wal()")
        wait_for(
            lambda: plan_restore(ctx.repository, "main", None).diff is not None,
            timeout=30,
            what="the differential's WAL to reach the archive",
        )
    try:
        assert diff["layout"] == "parts"
        changed_groups = {o["group"] for o in diff["objects"]}
        assert f"base/{_oid(cluster, 't_delta')}" in changed_groups
        expected = _fingerprints(cluster)
        expected_delta = cluster.psql(table_fingerprint_sql("tickets"), "t_delta").strip()

        # When the latest point is restored
        into = scratch_dir / f"restored-diff-{uuid.uuid4().hex[:6]}"
        plan = plan_restore(ctx.repository, "main", None)
        assert plan.diff is not None and plan.diff["backup_id"] == diff["backup_id"]
        restored = PgCluster(into, free_port())
        try:
            restore(ctx.repository, plan, into, start=True, port=restored.port)
            assert _fingerprints(restored) == expected
            assert restored.psql(table_fingerprint_sql("tickets"), "t_delta").strip() == expected_delta
        finally:
            restored.destroy()
    finally:
        cluster.psql("DROP DATABASE t_delta")


def test_a_new_targets_first_differential_waits_for_its_first_full(make_settings, cluster: PgCluster) -> None:
    from datetime import UTC, datetime, timedelta

    from messages.events import BackupDue
    from workers.errors import PermanentError
    from workers.handlers.backup import handle_backup_due
    from workers.handlers.first_backup import FIRST_BACKUP_WAIT, WaitingForFirstBackup

    ctx = worker_context(make_settings(target=cluster))  # a fresh prefix: no backup of this target yet
    slot = datetime.now(UTC).replace(microsecond=0)

    def diff(**when: datetime) -> BackupDue:
        return BackupDue.new(
            target="main", kind="diff", slot=slot, idempotency_key=f"d-{uuid.uuid4().hex}", **when
        )

    # Given the first differential due with the first full (a fresh `deskvault up`), then it waits: a
    # retry that is no failure, with no job claimed
    first = diff()
    with pytest.raises(WaitingForFirstBackup):
        handle_backup_due(ctx, first)
    assert ctx.ledger.job(first.idempotency_key) is None

    # and one due longer ago than the wait is refused, saying what to do (so it is dead-lettered)
    late = diff(occurred_at=datetime.now(UTC) - FIRST_BACKUP_WAIT - timedelta(minutes=1))
    with pytest.raises(PermanentError, match="no full backup of main for a differential to extend"):
        handle_backup_due(ctx, late)

    # and once the full is committed, the waiting differential, redelivered, is taken over it
    with wal_streaming(ctx, connected=cluster):
        take_backup(ctx, "full")
        assert handle_backup_due(ctx, first).startswith("diff backup ")


def test_a_lost_lease_in_any_parts_thread_stops_the_full_and_commits_nothing(
    make_settings, cluster: PgCluster
) -> None:
    ctx = worker_context(make_settings(target=cluster))
    engine = engine_for(ctx.settings.target("main"))
    calls = [0]

    def lease() -> None:
        calls[0] += 1
        if calls[0] > 40:  # a few parts in: the lease is gone
            raise RepositoryError("lease lost (test)")

    with fencing.fenced(lease), pytest.raises(RepositoryError, match="lease lost"):
        engine.full_backup(
            ctx.repository, backup_id="20261204T000000Z-full", job_key="k", event_id=str(uuid.uuid4())
        )

    assert catalog.list_manifests(ctx.repository, "main") == []
    assert (
        ctx.repository.store.multipart_uploads(catalog.backup_prefix("main", "20261204T000000Z-full")) == []
    )
    held = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'deskvault_full_%'"
    assert cluster.psql(held).strip() == "0"
    # and the server is not left in backup mode: a new full starts at once
    assert engine.full_backup(
        ctx.repository, backup_id="20261204T000100Z-full", job_key="k2", event_id="e"
    ).created


@pytest.mark.parametrize(
    ("path", "offset"),
    [("../outside", 0), ("/etc/passwd", 0), ("base/../../outside", 0), ("global/x", -5)],
)
def test_a_crafted_slice_cannot_write_outside_the_data_directory(
    make_settings, cluster: PgCluster, scratch_dir: Path, path: str, offset: int
) -> None:
    ctx = worker_context(make_settings(target=cluster))
    # A validly encrypted part whose manifest entry names a path out of the data directory
    source = scratch_dir / f"crafted-{uuid.uuid4().hex[:6]}"
    source.mkdir()
    (source / "x").write_bytes(b"owned" * 100)
    part = parts.Part("part-00001", "cluster", slice_of=DataFile("x", 500, 0), offset=0, length=500)
    (entry,) = parts.store_all(ctx.repository, source, [part], f"crafted/{uuid.uuid4().hex}/", parallel=1)
    entry["slice"] = {"path": path, "offset": offset, "length": 500}
    into = scratch_dir / f"into-{uuid.uuid4().hex[:6]}" / "data"
    into.mkdir(parents=True)
    hand_over(into)
    with pytest.raises((UnsafeMember, UnpackError)):
        parts.restore_all(ctx.repository, [entry], into, "crafted", parallel=1)
    assert not (into.parent / "outside").exists()
    assert (Path("/etc/passwd").read_bytes()[:5]) != b"owned"


def test_a_slice_longer_than_its_entry_says_is_refused(
    make_settings, cluster: PgCluster, scratch_dir: Path
) -> None:
    ctx = worker_context(make_settings(target=cluster))
    source = scratch_dir / f"long-{uuid.uuid4().hex[:6]}"
    source.mkdir()
    (source / "x").write_bytes(b"y" * 4000)
    part = parts.Part("part-00001", "cluster", slice_of=DataFile("x", 4000, 0), offset=0, length=4000)
    (entry,) = parts.store_all(ctx.repository, source, [part], f"crafted/{uuid.uuid4().hex}/", parallel=1)
    entry["slice"] = {"path": "x", "offset": 0, "length": 100}
    into = scratch_dir / f"into-{uuid.uuid4().hex[:6]}"
    into.mkdir()
    hand_over(into)
    with pytest.raises(UnpackError, match="more than its 100 bytes"):
        parts.restore_all(ctx.repository, [entry], into, "crafted", parallel=1)
