"""A target with a tablespace, against real PostgreSQL and SeaweedFS: full, differential, WAL, restore.

The table lives in a tablespace outside the data directory. A restore must bring its files back (from
the full and from the differential), lay them out where the mapping says, and start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import build_settings, free_port, run_cli, wait_for, wal_streaming, worker_context

from messages.events import BackupDue
from workers.engines.postgresql.cluster import PgCluster, hand_over
from workers.engines.postgresql.restore import plan_restore
from workers.handlers.backup import handle_backup_due
from workers.repository import catalog
from workers.repository.keyring import Keyring

pytestmark = pytest.mark.integration

LOCATION = "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'outside'"


@pytest.fixture(scope="module", params=["files", "stream"])
def source(scratch_dir: Path, request):
    """Given a cluster whose table `marks` lives in tablespace `outside`, in a folder beside the cluster;
    its fulls read from the data directory in parts, or through pg_basebackup (`full_method`)."""
    name = f"ts-{uuid.uuid4().hex[:6]}"
    cluster = PgCluster(scratch_dir / name, free_port(), tcp=True)
    cluster.initdb(extra_conf="track_commit_timestamp = on\n")
    cluster.start()
    location = scratch_dir / f"{name}-space"
    location.mkdir(mode=0o700)
    hand_over(location)
    cluster.psql(f"CREATE TABLESPACE outside LOCATION '{location}'")
    cluster.psql("CREATE TABLE marks (id int PRIMARY KEY, note text NOT NULL) TABLESPACE outside")
    cluster.psql("INSERT INTO marks SELECT i, 'row ' || i FROM generate_series(1, 100) i")
    cluster.psql("CREATE TABLE ticks (id int)")  # in the data directory
    cluster.psql("CHECKPOINT")
    time.sleep(2)  # files touched within a second of a full's start always go into the differential
    yield cluster, location, request.param
    cluster.destroy()
    shutil.rmtree(location, ignore_errors=True)


def backup(ctx, kind: str) -> str:
    event = BackupDue.new(
        target="main",
        kind=kind,
        slot=datetime.now(UTC).replace(microsecond=0),
        idempotency_key=f"ts-{kind}-{uuid.uuid4().hex}",
    )
    return handle_backup_due(ctx, event)


def commit_rows(cluster: PgCluster, ids: range) -> None:
    for i in ids:
        cluster.psql(f"INSERT INTO marks VALUES ({i}, 'row {i}')")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def history(source, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc):
    """Given full -> writes -> differential -> writes of that cluster, its WAL streamed to the archive."""
    cluster, _, method = source
    directory = tmp_path_factory.mktemp("tablespaces")
    key_file = directory / "keys.json"
    Keyring.create(key_file)
    settings = build_settings(
        directory,
        key_file,
        s3_endpoint,
        rabbit_url,
        control_db_odbc,
        cluster,
        target_options=f'full_method = "{method}"',
    )
    ctx = worker_context(settings)
    with wal_streaming(ctx, connected=cluster):
        assert backup(ctx, "full").startswith("full backup ")
        commit_rows(cluster, range(101, 104))
        assert backup(ctx, "diff").startswith("diff backup ")
        time.sleep(1.0)
        # A commit that touches nothing in the tablespace, before the next row rewrites the table's page.
        cluster.psql("INSERT INTO ticks VALUES (1)")
        time.sleep(1.0)
        commit_rows(cluster, range(104, 107))
        last = datetime.fromisoformat(
            cluster.psql("SELECT pg_xact_commit_timestamp(xmin) FROM marks WHERE id = 106").strip()
        )
        wait_for(
            lambda: plan_restore(ctx.repository, "main", None).window.latest > last,
            timeout=30,
            what="the last commit to reach the archive",
        )
        yield settings, ctx


def start_restored(into: Path) -> PgCluster:
    cluster = PgCluster(into, free_port())
    cluster.start()
    return cluster


def assert_server_owned_private(folder: Path) -> None:
    st = folder.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    assert st.st_uid == (pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid())


def test_full_and_differential_carry_the_tablespace(history) -> None:
    _, ctx = history
    full, diff = (m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] in ("full", "diff"))
    (space,) = full["tablespaces"]
    assert space["name"] == "outside"
    if full.get("layout") == "parts":
        # its databases' files are in parts of their own, which retention keeps and the commit checked
        inside = [o for o in full["objects"] if o["group"].startswith(f"pg_tblspc/{space['oid']}/")]
        assert inside and {o["key"] for o in inside} <= catalog.referenced_keys(full)
    else:
        # the tablespace is an object of its own, which retention keeps and the commit checked
        assert space["key"] in catalog.referenced_keys(full)
    assert [t["oid"] for t in diff["tablespaces"]] == [space["oid"]]


def test_a_table_in_a_tablespace_survives_full_writes_differential_and_a_latest_restore(
    history, source, scratch_dir
) -> None:
    settings, ctx = history
    _, original, _ = source
    into = scratch_dir / f"ts-latest-{uuid.uuid4().hex[:6]}"
    oid = catalog.list_manifests(ctx.repository, "main")[0]["tablespaces"][0]["oid"]

    restored = run_cli(settings, "restore", "--target", "main", "--into", str(into))

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "+ differential" in restored.stdout
    beside = into.parent / f"{into.name}.tablespaces" / str(oid)
    assert f"tablespace outside (oid {oid}, was {original}) restored into {beside}" in restored.stdout
    assert os.readlink(into / "pg_tblspc" / str(oid)) == str(beside)
    assert_server_owned_private(beside)
    cluster = start_restored(into)
    try:
        assert cluster.psql("SELECT count(*), max(id) FROM marks").strip() == "106|106"
        location = cluster.psql(
            "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'outside'"
        )
        assert location.strip() == str(beside)
    finally:
        cluster.destroy()


def test_a_table_in_a_tablespace_restores_at_a_moment_just_after_the_differential_to_a_mapped_folder(
    history, scratch_dir
) -> None:
    settings, ctx = history
    diff = next(m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] == "diff")
    # The moment the differential finished, a second before the next commit: rows 101-103 are only in
    # its copy of the tablespace's files, as no WAL replayed up to then rewrites their page.
    at_text = diff["finished_at"]
    into = scratch_dir / f"ts-at-{uuid.uuid4().hex[:6]}"
    mapped = scratch_dir / f"ts-mapped-{uuid.uuid4().hex[:6]}" / "outside"

    restored = run_cli(
        settings,
        "restore",
        "--target",
        "main",
        "--into",
        str(into),
        "--at",
        at_text,
        "--tablespace",
        f"outside={mapped}",
    )

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"differential {diff['backup_id']}" in restored.stdout
    assert f"restored into {mapped}" in restored.stdout
    assert not (into.parent / f"{into.name}.tablespaces").exists()
    assert_server_owned_private(mapped)
    cluster = start_restored(into)
    try:
        wait_for(lambda: cluster.psql("SELECT NOT pg_is_in_recovery()").strip() == "t", what="recovery")
        assert cluster.psql("SELECT count(*), max(id) FROM marks").strip() == "103|103"
        location = cluster.psql(
            "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'outside'"
        )
        assert location.strip() == str(mapped)
    finally:
        cluster.destroy()
