"""Point-in-time recovery against real PostgreSQL and SeaweedFS: WAL streamed, restored to any second.

Every row is stamped with its transaction's real commit time (track_commit_timestamp), so a restore to
T must hold exactly the rows whose commit time is at or before T.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest
from prometheus_client import REGISTRY
from support import (
    build_settings,
    commit_times,
    free_port,
    marks_cluster,
    raw_s3,
    run_cli,
    streamed_target,
    take_backup,
    wait_for,
    worker_context,
)

from deskvault_core.config import TenantSettings
from deskvault_core.errors import DeskvaultError
from messages.events import ExportRequested, RestoreDrill
from workers.context import WorkerContext
from workers.engines.base import Unreachable
from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.restore import plan_restore, restore
from workers.engines.postgresql.walarchive import list_wal
from workers.errors import HandlerError
from workers.handlers.drill import handle_restore_drill
from workers.handlers.export import handle_export_requested
from workers.handlers.first_backup import FIRST_BACKUP_WAIT, WaitingForFirstBackup
from workers.repository import catalog
from workers.repository.keyring import Keyring
from workers.state_metrics import StateCollector
from workers.tenants import exports
from workers.tenants.keys import tenant_repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def source(scratch_dir: Path):
    with marks_cluster(scratch_dir, "pitr", columns="id int PRIMARY KEY, note text NOT NULL") as cluster:
        yield cluster


def commit_rows(cluster: PgCluster, ids: range) -> None:
    for i in ids:
        cluster.psql(f"INSERT INTO marks VALUES ({i}, 'row {i}')")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def history(source: PgCluster, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc):
    """Given a target streamed to the archive through full, writes, differential, writes, log, writes."""
    directory = tmp_path_factory.mktemp("pitr")
    with streamed_target(directory, source, s3_endpoint, rabbit_url, control_db_odbc) as (settings, ctx):
        assert take_backup(ctx, "full").startswith("full backup ")
        commit_rows(source, range(1, 5))
        assert take_backup(ctx, "diff").startswith("diff backup ")
        commit_rows(source, range(5, 9))
        assert take_backup(ctx, "log").startswith("log backup ")
        commit_rows(source, range(9, 13))
        times = commit_times(source)
        # the newest commit is in the bucket within seconds, in the partial segment
        wait_for(
            lambda: plan_restore(ctx.repository, "main", None).window.latest > times[12],
            timeout=30,
            what="the last commit to reach the archive",
        )
        yield settings, ctx, times


def restored_ids(ctx, at: datetime | None, scratch_dir: Path) -> tuple[set[int], datetime | None]:
    """When the target is restored to `at` and started, the ids it holds and the time it reached."""
    plan = plan_restore(ctx.repository, "main", at)
    into = scratch_dir / f"pitr-restore-{uuid.uuid4().hex[:6]}"
    cluster = PgCluster(into, free_port())
    try:
        result = restore(ctx.repository, plan, into, start=True, port=cluster.port)
        return {int(x) for x in cluster.psql("SELECT id FROM marks").split()}, result.reached
    finally:
        cluster.destroy()


@pytest.mark.parametrize(
    "between",
    [(2, 3), (6, 7), (8, 9), (11, 12)],
    ids=["before-the-diff", "after-the-diff", "around-the-log-backup", "inside-the-last-segment"],
)
def test_restore_to_a_moment_between_two_commits_one_second_apart(history, scratch_dir, between) -> None:
    _, ctx, times = history
    before, after = times[between[0]], times[between[1]]
    at = before + (after - before) / 2

    ids, reached = restored_ids(ctx, at, scratch_dir)

    assert ids == {i for i, t in times.items() if t <= at}
    assert reached is not None and before - timedelta(milliseconds=1) <= reached <= at


def test_just_after_the_differential_it_is_used_and_exact(history, scratch_dir) -> None:
    _, ctx, times = history
    diff = next(m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] == "diff")
    finished = datetime.fromisoformat(diff["finished_at"])
    at = finished + (times[5] - finished) / 2  # the next commit follows within milliseconds
    assert times[4] < at < times[5]

    assert plan_restore(ctx.repository, "main", at).diff["backup_id"] == diff["backup_id"]
    assert plan_restore(ctx.repository, "main", times[4]).diff is None  # before it: full + WAL only
    ids, _ = restored_ids(ctx, at, scratch_dir)
    assert ids == {1, 2, 3, 4}


def test_the_differential_holds_only_what_changed(history) -> None:
    _, ctx, _ = history
    full, diff = (m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] in ("full", "diff"))
    assert diff["parent"] == full["backup_id"]
    assert 0 < diff["plain_size"] < full["plain_size"] / 4
    assert "START WAL LOCATION" in diff["backup_label"]


def test_restore_without_a_time_gives_every_archived_commit(history, scratch_dir) -> None:
    _, ctx, times = history
    ids, _ = restored_ids(ctx, None, scratch_dir)
    assert ids == set(times)


def test_unreachable_moments_are_refused_before_anything_is_downloaded(history) -> None:
    _, ctx, _ = history
    window = plan_restore(ctx.repository, "main", None).window
    with pytest.raises(Unreachable, match="before the oldest full backup"):
        plan_restore(ctx.repository, "main", window.earliest - timedelta(seconds=1))
    with pytest.raises(Unreachable, match="after the newest archived WAL"):
        plan_restore(ctx.repository, "main", datetime.now(UTC) + timedelta(hours=1))


def test_the_listing_shows_the_chain_the_wal_and_the_window(history) -> None:
    settings, _, times = history
    listing = run_cli(settings, "backups", "list", "--target", "main", "--json")
    assert listing.returncode == 0, listing.stderr
    found = json.loads(listing.stdout)
    assert [b["kind"] for b in found["backups"]] == ["full", "diff", "log"]
    assert found["chains"] == [
        {"full": found["backups"][0]["backup_id"], "diffs": [found["backups"][1]["backup_id"]]}
    ]
    assert found["wal"]["segments"] >= 2 and found["wal"]["gaps"] == []
    window = found["restorable_window"]
    assert (
        datetime.fromisoformat(window["earliest"])
        < times[1]
        < times[12]
        <= datetime.fromisoformat(window["latest"])
    )


def test_verify_passes_on_an_intact_archive(history) -> None:
    settings, _, _ = history
    result = run_cli(settings, "backups", "verify", "--target", "main")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK:" in result.stdout and "no WAL gaps" in result.stdout


def _damaged(original: bytes, partner: bytes, how: str) -> bytes:
    data = bytearray(original)
    if how == "flipped byte":
        data[len(data) // 2] ^= 0x20
    elif how == "truncated":
        del data[len(data) // 2 :]
    elif how == "reordered":  # two blocks of the ciphertext change places
        a, b, n = len(data) // 3, 2 * len(data) // 3, 16
        data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
    else:  # "swapped": another valid object of the repository stored under this key
        return partner
    return bytes(data)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "reordered", "swapped"])
@pytest.mark.parametrize("kind", ["full data", "differential data", "manifest", "WAL segment"])
def test_a_damaged_object_is_named_by_verify_and_by_restore(history, scratch_dir, kind, how) -> None:
    # Given one damaged object (swapped: two objects exchanged), put back afterwards for the other tests
    settings, ctx, times = history
    manifests = catalog.list_manifests(ctx.repository, "main")
    full, diff, log_backup = (next(m for m in manifests if m["kind"] == k) for k in ("full", "diff", "log"))
    plan = plan_restore(ctx.repository, "main", times[12])
    needed = next(e.key for e in plan.wal if not e.partial)
    other = next(e.key for e in list_wal(ctx.repository, "main") if not e.partial and e.key != needed)
    key, partner = {
        "full data": (full["objects"][0]["key"], diff["objects"][0]["key"]),
        "differential data": (diff["objects"][0]["key"], full["objects"][0]["key"]),
        "manifest": (
            catalog.manifest_key("main", diff["backup_id"]),
            catalog.manifest_key("main", log_backup["backup_id"]),
        ),
        "WAL segment": (needed, other),
    }[kind]
    s3 = raw_s3(settings)
    bucket, prefix = settings.repository.bucket, settings.repository.prefix
    originals = {k: s3.get_object(Bucket=bucket, Key=prefix + k)["Body"].read() for k in (key, partner)}
    s3.put_object(Bucket=bucket, Key=prefix + key, Body=_damaged(originals[key], originals[partner], how))
    if how == "swapped":
        s3.put_object(Bucket=bucket, Key=prefix + partner, Body=originals[key])
    try:
        # When verify runs, then it names the object and fails
        verify = run_cli(settings, "backups", "verify", "--target", "main")
        assert verify.returncode == 1
        assert f"BAD {key}" in verify.stdout
        if how == "swapped":
            assert f"BAD {partner}" in verify.stdout

        into = scratch_dir / f"damaged-{uuid.uuid4().hex[:6]}"
        if kind == "manifest":
            # and a restore plans around the unusable backup (full + WAL reach the same moment), naming it
            replanned = plan_restore(ctx.repository, "main", times[12])
            assert replanned.diff is None
            assert any(key in skipped for skipped in replanned.skipped)
        else:
            # and a restore that needs it fails naming it (or its swapped partner), leaving no folder
            names = f"({re.escape(key)}|{re.escape(partner)})" if how == "swapped" else re.escape(key)
            with pytest.raises(DeskvaultError, match=names):
                restore(ctx.repository, plan_restore(ctx.repository, "main", times[12]), into)
            assert not into.exists()
    finally:
        for k, body in originals.items():
            s3.put_object(Bucket=bucket, Key=prefix + k, Body=body)


def _verified_at(ctx) -> float:
    """The restore-verified gauge as a worker serves it (read from the ledger at scrape time)."""
    collector = StateCollector(ctx.settings, ("verify",), ctx.ledger)
    found = [
        s.value
        for family in collector.collect()
        for s in family.samples
        if s.name == "deskvault_restore_verified_timestamp_seconds" and s.labels == {"target": "main"}
    ]
    return found[0] if found else 0.0


def test_a_restore_drill_runs_end_to_end_and_moves_its_metrics(history) -> None:
    _, ctx, _ = history
    before = _verified_at(ctx)
    passed = REGISTRY.get_sample_value(
        "deskvault_restore_drills_total", {"target": "main", "outcome": "passed"}
    )
    event = RestoreDrill.new(
        target="main",
        slot=datetime.now(UTC).replace(second=0, microsecond=0),
        idempotency_key=f"drill-{uuid.uuid4().hex}",
    )

    outcome = handle_restore_drill(ctx, event)

    assert outcome.startswith("drill passed: main restored to ")
    assert "pg_amcheck clean" in outcome and "public.marks=" in outcome
    assert _verified_at(ctx) > before
    now_passed = REGISTRY.get_sample_value(
        "deskvault_restore_drills_total", {"target": "main", "outcome": "passed"}
    )
    assert now_passed == (passed or 0) + 1
    drill = ctx.ledger.drills("main")[-1]
    assert drill["succeeded"] and drill["drill_id"] == event.idempotency_key
    window = plan_restore(ctx.repository, "main", None).window
    assert window.earliest <= drill["point_in_time"] <= window.latest
    assert not list(Path(tempfile.gettempdir()).glob("deskvault-drill-main-*"))  # torn down


def test_a_drill_waits_for_a_new_targets_first_full_then_records_its_absence_as_a_failure(
    source, tmp_path, s3_endpoint, rabbit_url, control_db_odbc
) -> None:
    # Given the same target backed up to a fresh, empty repository prefix
    key_file = tmp_path / "keys.json"
    Keyring.create(key_file)
    ctx = worker_context(build_settings(tmp_path, key_file, s3_endpoint, rabbit_url, control_db_odbc, source))
    drills = len(ctx.ledger.drills("main"))
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    due_now = RestoreDrill.new(target="main", slot=slot, idempotency_key=f"drill-{uuid.uuid4().hex}")

    # When its drill is due as the first full is (a fresh `deskvault up`), then it waits for that
    # full: a retry that is no failure, with no job claimed and no drill recorded
    with pytest.raises(WaitingForFirstBackup):
        handle_restore_drill(ctx, due_now)
    assert ctx.ledger.job(due_now.idempotency_key) is None
    assert len(ctx.ledger.drills("main")) == drills

    # while a redelivery of a drill already done is a duplicate, not a wait
    done = RestoreDrill.new(target="main", slot=slot, idempotency_key=f"drill-{uuid.uuid4().hex}")
    key = done.idempotency_key
    ctx.ledger.claim(key, pool="verify", event_type=done.type, event_id=done.event_id, owner="t")
    ctx.ledger.complete(key, "t", "done by an earlier delivery")
    assert handle_restore_drill(ctx, done) is None

    # and a drill due longer ago than the wait is a failed drill, recorded with the reason
    long_due = RestoreDrill.new(
        target="main",
        slot=slot - FIRST_BACKUP_WAIT,
        idempotency_key=f"drill-{uuid.uuid4().hex}",
        occurred_at=datetime.now(UTC) - FIRST_BACKUP_WAIT - timedelta(minutes=1),
    )
    outcome = handle_restore_drill(ctx, long_due)
    assert outcome.startswith("drill FAILED: restoring main to ") and "no full backup yet" in outcome
    recorded = ctx.ledger.drills("main")[-1]
    assert not recorded["succeeded"] and recorded["drill_id"] == long_due.idempotency_key


def test_an_export_as_of_a_moment_holds_exactly_the_rows_committed_by_then(history, source, tmp_path) -> None:
    settings, ctx, times = history
    # A tenant whose helpdesk is this target's `postgres` database (where the marks table lives).
    tenant = TenantSettings(
        name=f"m{uuid.uuid4().hex[:8]}", plan="company", database="postgres", target="main"
    )
    settings = dataclasses.replace(settings, tenants={tenant.name: tenant})
    ctx = WorkerContext(settings=settings, ledger=ctx.ledger, repository=ctx.repository)
    at = times[6] + (times[7] - times[6]) / 2
    event = ExportRequested.new(tenant=tenant.name, request_id="PITR-1", requested_by="ann", as_of=at)

    outcome = handle_export_requested(ctx, event)

    assert f"of tenant {tenant.name} as of {at:%Y-%m-%dT%H:%M:%SZ} ready" in outcome
    (manifest,) = exports.list_exports(tenant_repository(ctx, tenant.name), tenant.name)
    dump = tmp_path / "asof.dump"
    with dump.open("wb") as f:
        for chunk in tenant_repository(ctx, tenant.name).get_stream(
            manifest["dump_key"], expect_sha256=manifest["sha256"]
        ):
            f.write(chunk)
    database = f"asof_{uuid.uuid4().hex[:8]}"
    source.psql(f"CREATE DATABASE {database}")
    subprocess.run(
        [
            str(source.pg_bin / "pg_restore"),
            "-h",
            "127.0.0.1",
            "-p",
            str(source.port),
            "-U",
            "postgres",
            "-d",
            database,
            "--no-owner",
            str(dump),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert {int(x) for x in source.psql("SELECT id FROM marks", database).split()} == set(range(1, 7))


def test_the_live_rpo_gauge_follows_the_archive(history) -> None:
    _, _, times = history

    def archived() -> float:
        return (
            REGISTRY.get_sample_value("deskvault_wal_archived_timestamp_seconds", {"target": "main"}) or 0.0
        )

    # Set after each upload round while the receiver runs: within a round or two it passes the last commit.
    wait_for(
        lambda: archived() >= times[12].timestamp(), timeout=15, what="the gauge to pass the last commit"
    )
    assert archived() <= time.time()


def test_a_gap_in_the_archive_is_named(history, scratch_dir) -> None:
    # Runs last in this module: it removes a segment from the archive.
    settings, ctx, times = history
    base_start = plan_restore(ctx.repository, "main", None).wal[0].segment
    segments = [e for e in list_wal(ctx.repository, "main") if e.segment is not None and not e.partial]
    missing = next(e for e in segments if e.segment > base_start)
    ctx.repository.delete(missing.key)
    # Refused while planning, before anything is downloaded, naming the segment.
    into = scratch_dir / f"gap-{uuid.uuid4().hex[:6]}"
    with pytest.raises(Unreachable, match=f"gap in the WAL archive.*{missing.filename}"):
        restore(ctx.repository, plan_restore(ctx.repository, "main", times[12]), into)
    assert not into.exists()

    # and the hourly log backup sees the broken chain and asks for a full at once, keyed by the gap
    with pytest.raises(HandlerError, match="a full backup was requested"):
        take_backup(ctx, "log")
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker.url))
    channel, queued = connection.channel(), []
    while (message := channel.basic_get("backup", auto_ack=True))[0] is not None:
        queued.append(json.loads(message[2])["args"][0])
    connection.close()
    assert f"backup-due:main:full:gap-{missing.filename}" in [e["idempotency_key"] for e in queued]
