"""Timelines: the runbook's "restore to T, make the copy the new primary" leaves a target on a new
timeline. The streamer follows it from the fork, history files reach the archive, new backups chain on
the new timeline, and the restorable window spans both sides of the switch, exact to the row."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import free_port, marks_cluster, take_backup, wait_for, wal_streaming, worker_context

from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.diff import diff_backup
from workers.engines.postgresql.restore import plan_restore, restore
from workers.engines.postgresql.walarchive import list_wal
from workers.errors import PermanentError
from workers.repository import catalog

pytestmark = pytest.mark.integration


@pytest.fixture
def source(scratch_dir: Path) -> Iterator[PgCluster]:
    with marks_cluster(scratch_dir, "timeline") as cluster:
        yield cluster


@pytest.fixture
def copy(source: PgCluster) -> Iterator[PgCluster]:
    """The restored copy that takes the source's folder and address once it is promoted."""
    cluster = PgCluster(source.datadir, source.port, tcp=True)
    yield cluster
    cluster.destroy()


def _commit(cluster: PgCluster, ids: range) -> dict[int, datetime]:
    for i in ids:
        cluster.psql(f"INSERT INTO marks VALUES ({i})")
        time.sleep(0.6)
    rows = cluster.psql("SELECT id, pg_xact_commit_timestamp(xmin) FROM marks").splitlines()
    return {int(i): datetime.fromisoformat(ts) for i, ts in (r.split("|") for r in rows)}


def _timeline(cluster: PgCluster) -> int:
    return int(cluster.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)").strip(), 16)


def _archived_until(ctx, moment: datetime) -> bool:
    return plan_restore(ctx.repository, "main", None).window.latest > moment


def _restored(ctx, at: datetime | None, scratch_dir: Path) -> tuple[set[int], int]:
    """The ids a restore to `at` holds once recovered, and the timeline it was promoted onto."""
    into = scratch_dir / f"timeline-restore-{uuid.uuid4().hex[:6]}"
    cluster = PgCluster(into, free_port())
    try:
        plan = plan_restore(ctx.repository, "main", at)
        restore(ctx.repository, plan, into, start=True, port=cluster.port)
        return {int(x) for x in cluster.psql("SELECT id FROM marks").split()}, _timeline(cluster)
    finally:
        cluster.destroy()


def test_a_copy_promoted_as_the_target_streams_on_its_new_timeline_and_both_sides_restore_exactly(
    make_settings, source: PgCluster, copy: PgCluster, scratch_dir: Path
) -> None:
    settings = make_settings(target=source)
    ctx = worker_context(settings)
    with wal_streaming(ctx):
        # Given a full and writes on timeline 1, the old primary going on after the moment T, into the
        # next segment (so the spool's newest WAL lies beyond the fork)
        assert take_backup(ctx, "full").startswith("full backup ")
        before = _commit(source, range(1, 5))
        source.psql("SELECT pg_switch_wal()")
        after_t = _commit(source, range(5, 7))
        wait_for(lambda: _archived_until(ctx, after_t[6]), timeout=60, what="timeline 1's WAL in the archive")
        # When the target is restored to T (row 2) and the copy takes the old primary's place (its folder
        # and address, as ops/runbooks/restore-target.md does it)
        restored = scratch_dir / f"timeline-copy-{uuid.uuid4().hex[:6]}"
        restore(ctx.repository, plan_restore(ctx.repository, "main", before[2]), restored)
        (restored / "pg_hba.conf.from-backup").replace(restored / "pg_hba.conf")  # opened deliberately
        source.stop()
        source.datadir.rename(source.datadir.with_name(source.datadir.name + ".old"))
        restored.rename(copy.datadir)
        copy.start()
        wait_for(lambda: copy.psql("SELECT pg_is_in_recovery()").strip() == "f", what="the copy's promotion")
        assert {int(x) for x in copy.psql("SELECT id FROM marks").split()} == {1, 2}
        assert _timeline(copy) == 2
        # And writes go on there
        switched = _commit(copy, range(7, 11))
        # Then the streamer follows the new timeline, and its history file reaches the archive
        wait_for(
            lambda: _archived_until(ctx, switched[10]),
            timeout=120,
            what="timeline 2's WAL in the archive (the streamer following the new primary)",
        )
        assert "00000002.history" in {e.filename for e in list_wal(ctx.repository, "main")}
        # And a differential and a log backup chain across the switch, then a new full on timeline 2
        assert take_backup(ctx, "diff").startswith("diff backup ")
        after_diff = _commit(copy, range(11, 12))
        assert take_backup(ctx, "log").startswith("log backup "), "the log backup saw a gap at the switch"
        assert take_backup(ctx, "full").startswith("full backup ")
        latest = _commit(copy, range(12, 14))
        wait_for(lambda: _archived_until(ctx, latest[13]), timeout=60, what="the newest commit archived")

        # Then a moment before the switch restores exactly, promoted onto a timeline no one used (3)
        assert _restored(ctx, before[1], scratch_dir) == ({1}, 3)
        # And a moment after the switch, before the new full, restores across it from the old full
        assert _restored(ctx, switched[8], scratch_dir)[0] == {1, 2, 7, 8}
        # And one after the differential taken on the new timeline, from the old full and it
        assert _restored(ctx, after_diff[11], scratch_dir)[0] == {1, 2, 7, 8, 9, 10, 11}
        # And the latest moment, and one just before it, from the new full
        assert _restored(ctx, None, scratch_dir)[0] == {1, 2, 7, 8, 9, 10, 11, 12, 13}
        assert _restored(ctx, latest[12] + timedelta(milliseconds=1), scratch_dir)[0] == {
            1,
            2,
            7,
            8,
            9,
            10,
            11,
            12,
        }


def test_a_differential_refuses_a_data_directory_that_is_not_the_servers(
    make_settings, source: PgCluster, scratch_dir: Path
) -> None:
    # Given a full, and the config's data_directory left at another cluster's folder (the old primary's)
    settings = make_settings(target=source)
    ctx = worker_context(settings)
    assert take_backup(ctx, "full").startswith("full backup ")
    other = PgCluster(scratch_dir / f"timeline-other-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    other.initdb()
    target = dataclasses.replace(settings.target("main"), data_directory=str(other.datadir))
    full = catalog.list_manifests(ctx.repository, "main")[-1]
    backup_id = catalog.backup_id_for("diff", datetime.now(UTC).replace(microsecond=0))

    # When a differential runs, then it is refused, naming the field, and nothing is committed
    with pytest.raises(PermanentError, match=r"targets\.main\.data_directory .* is not the data directory"):
        diff_backup(target, ctx.repository, backup_id=backup_id, full=full, job_key="k", event_id="e")
    assert not ctx.repository.exists(catalog.manifest_key("main", backup_id))
    other.destroy()
