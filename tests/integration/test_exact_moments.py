"""Every moment of the restorable window restores exactly, and a restore never claims what it did not reach.

One target driven through full -> commits one second apart with idle gaps of several seconds ->
differential -> more commits -> log backup -> more commits, streamed by a worker whose time zone is not
UTC. Every row is stamped with its transaction's commit time (track_commit_timestamp), so a restore to T
must hold exactly the rows committed at or before T, wherever T falls: in an idle gap, between two
commits, just after the differential, after the last commit.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from support import commit_times, free_port, marks_cluster, run_cli, streamed_target, take_backup, wait_for

from deskvault_core.errors import DeskvaultError
from workers.engines.base import RestoreGoal
from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.restore import plan_restore, restore
from workers.engines.postgresql.walnames import format_lsn
from workers.repository import catalog

pytestmark = pytest.mark.integration

IDLE_GAP = 5.0


@pytest.fixture(scope="module")
def berlin_time() -> Iterator[None]:
    """The worker (streamer and restores) runs in a zone that is not UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture(scope="module")
def source(scratch_dir: Path) -> Iterator[PgCluster]:
    with marks_cluster(scratch_dir, "moments") as cluster:
        yield cluster


def commit(cluster: PgCluster, ids: range, pause: float = 1.0) -> None:
    for i in ids:
        cluster.psql(f"INSERT INTO marks VALUES ({i})")
        time.sleep(pause)


@pytest.fixture(scope="module")
def history(berlin_time, source, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc):
    directory = tmp_path_factory.mktemp("moments")
    with streamed_target(directory, source, s3_endpoint, rabbit_url, control_db_odbc) as (settings, ctx):
        assert take_backup(ctx, "full").startswith("full backup ")
        time.sleep(IDLE_GAP)
        commit(source, range(1, 4))
        time.sleep(IDLE_GAP)
        commit(source, range(4, 6), pause=0.3)
        assert take_backup(ctx, "diff").startswith("diff backup ")
        commit(source, range(6, 9))
        time.sleep(IDLE_GAP)
        commit(source, range(9, 11))
        assert take_backup(ctx, "log").startswith("log backup ")
        commit(source, range(11, 13))
        time.sleep(IDLE_GAP)
        times = commit_times(source)
        wait_for(
            lambda: (
                plan_restore(ctx.repository, "main", None).window.latest > times[12] + timedelta(seconds=3)
            ),
            timeout=30,
            what="the window to pass the last commit by seconds",
        )
        yield settings, ctx, times


def restored_ids(ctx, scratch_dir: Path, at: datetime | None = None, goal: RestoreGoal | None = None):
    plan = plan_restore(ctx.repository, "main", at, goal=goal)
    into = scratch_dir / f"moment-{uuid.uuid4().hex[:6]}"
    cluster = PgCluster(into, free_port())
    try:
        result = restore(ctx.repository, plan, into, start=True, port=cluster.port)
        return {int(x) for x in cluster.psql("SELECT id FROM marks").split()}, result
    finally:
        cluster.destroy()


def moments(times: dict[int, datetime], diff_finished: datetime, window) -> list[datetime]:
    """30 moments spread over every kind of place in the window, the same each run."""
    rnd = random.Random(14)
    stamps = sorted(times.values())
    pairs = list(itertools.pairwise(stamps))
    gaps = [(a, b) for a, b in pairs if b - a > timedelta(seconds=IDLE_GAP - 1)]
    close = [(a, b) for a, b in pairs if b - a < timedelta(seconds=2)]
    chosen = [window.earliest, window.latest, stamps[0], stamps[-1], diff_finished]
    chosen += [a + (b - a) * rnd.random() for a, b in rnd.choices(gaps, k=7)]
    chosen += [a + (b - a) * rnd.random() for a, b in rnd.choices(close, k=8)]
    chosen += [diff_finished + timedelta(milliseconds=rnd.randint(1, 300)) for _ in range(2)]
    chosen += [stamps[-1] + (window.latest - stamps[-1]) * rnd.random() for _ in range(3)]
    chosen += [window.earliest + (window.latest - window.earliest) * rnd.random() for _ in range(5)]
    assert len(chosen) == 30
    return chosen


def test_thirty_moments_across_the_window_each_restore_exactly_what_was_committed_by_then(
    history, scratch_dir
) -> None:
    _, ctx, times = history
    window = plan_restore(ctx.repository, "main", None).window
    diff = next(m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] == "diff")
    wrong = []
    for at in moments(times, datetime.fromisoformat(diff["finished_at"]), window):
        ids, result = restored_ids(ctx, scratch_dir, at)
        expected = {i for i, t in times.items() if t <= at}
        if ids != expected:
            wrong.append(f"{at.isoformat()}: got {sorted(ids)}, expected {sorted(expected)} ({result.stop})")
        elif expected and "consistency point" not in result.stop:
            last = max(expected, key=lambda i: times[i])
            if result.reached != times[last]:  # reported exactly: the last commit replayed
                wrong.append(f"{at.isoformat()}: reported {result.reached}, expected {times[last]}")
    assert wrong == []


def test_a_transaction_an_lsn_and_a_named_restore_point_each_restore_exactly(
    history, source, scratch_dir
) -> None:
    settings, ctx, times = history
    xid = int(source.psql("SELECT xmin FROM marks WHERE id = 7").strip())
    ids, result = restored_ids(ctx, scratch_dir, goal=RestoreGoal(xid=xid))
    assert ids == set(range(1, 8)) and f"transaction {xid}" in result.stop

    # An LSN between two commits (the record right after commit 9's): everything before it, nothing after.
    plan_9 = plan_restore(ctx.repository, "main", times[9])
    plan_10 = plan_restore(ctx.repository, "main", times[10])
    assert plan_9.stop.end is not None and plan_9.stop.end < plan_10.stop.lsn
    ids, result = restored_ids(ctx, scratch_dir, goal=RestoreGoal(lsn=format_lsn(plan_9.stop.end)))
    assert ids == set(range(1, 10)) and format_lsn(plan_9.stop.end) in result.stop

    # A named restore point made through the CLI (the module's streamer archives it), then restored.
    marked = run_cli(settings, "mark", "--target", "main", "before-the-purge")
    assert marked.returncode == 0, marked.stdout + marked.stderr
    assert "archived" in marked.stdout
    source.psql("INSERT INTO marks VALUES (100)")  # after the point: must not come back
    into = scratch_dir / f"named-{uuid.uuid4().hex[:6]}"
    port = free_port()
    restored = run_cli(
        settings,
        "restore",
        "--target",
        "main",
        "--name",
        "before-the-purge",
        "--into",
        str(into),
        "--start",
        "--port",
        str(port),
    )
    cluster = PgCluster(into, port)
    try:
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert "restore point 'before-the-purge'" in restored.stdout
        assert {int(x) for x in cluster.psql("SELECT id FROM marks").split()} == set(times)
    finally:
        cluster.destroy()


@pytest.mark.parametrize(
    "option",
    [["--xid", "4000000000"], ["--lsn", "FF/0"], ["--name", "never-made"], ["--lsn", "not-an-lsn"]],
    ids=["xid", "lsn", "name", "bad-lsn"],
)
def test_an_unreachable_goal_is_refused_before_anything_is_downloaded(history, scratch_dir, option) -> None:
    settings, _, _ = history
    into = scratch_dir / f"refused-{uuid.uuid4().hex[:6]}"
    refused = run_cli(settings, "restore", "--target", "main", *option, "--into", str(into))
    assert refused.returncode != 0
    assert option[1] in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert not into.exists() and not into.with_name(into.name + ".wal").exists()


class DelayedRepository:
    """The test's repository, with the download of one object held back (a slow or stuck transfer)."""

    def __init__(self, repo, key: str, delay: float) -> None:
        self._repo, self._key, self._delay = repo, key, delay

    def __getattr__(self, name: str):
        return getattr(self._repo, name)

    def get_stream(self, key: str, **kwargs):
        if key == self._key:
            time.sleep(self._delay)
        return self._repo.get_stream(key, **kwargs)


def test_a_wal_file_later_than_the_fetch_waits_fails_the_restore_naming_it(history, scratch_dir) -> None:
    _, ctx, times = history
    plan = plan_restore(ctx.repository, "main", times[12])
    late = plan.wal[-2] if len(plan.wal) > 1 else plan.wal[-1]
    slow = DelayedRepository(ctx.repository, late.key, delay=8)
    into = scratch_dir / f"late-{uuid.uuid4().hex[:6]}"
    with pytest.raises(DeskvaultError, match=f"WAL file {late.filename.removesuffix('.partial')}"):
        restore(slow, plan, into, start=True, port=free_port(), wal_patience=2)
    # Left for inspection, but not running: nothing half-recovered serves queries.
    assert not (into / "postmaster.pid").exists()


def test_a_wal_file_late_but_within_the_fetchs_patience_is_waited_for(history, scratch_dir) -> None:
    _, ctx, times = history
    plan = plan_restore(ctx.repository, "main", times[12])
    slow = DelayedRepository(ctx.repository, plan.wal[-1].key, delay=4)
    into = scratch_dir / f"waited-{uuid.uuid4().hex[:6]}"
    cluster = PgCluster(into, free_port())
    try:
        restore(slow, plan, into, start=True, port=cluster.port, wal_patience=60)
        assert {int(x) for x in cluster.psql("SELECT id FROM marks").split()} == set(times)
    finally:
        cluster.destroy()


def test_a_download_that_fails_fails_the_restore_naming_the_file(history, scratch_dir) -> None:
    _, ctx, times = history
    plan = plan_restore(ctx.repository, "main", times[12])
    broken = plan.wal[-1]

    class Failing(DelayedRepository):
        def get_stream(self, key: str, **kwargs):
            if key == broken.key:
                raise DeskvaultError("the object store refused the read (test)")
            return self._repo.get_stream(key, **kwargs)

    into = scratch_dir / f"failed-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with pytest.raises(
        DeskvaultError, match=f"download of WAL file {broken.filename.removesuffix('.partial')}"
    ):
        restore(Failing(ctx.repository, "", 0), plan, into, start=True, port=free_port())
    assert time.monotonic() - started < 120  # the fetch stops waiting at once
    assert not into.exists()


@pytest.fixture
def quiet_source(scratch_dir: Path) -> Iterator[PgCluster]:
    with marks_cluster(scratch_dir, "down", commit_timestamps=False) as cluster:
        yield cluster


def test_the_latest_restore_after_a_differential_taken_while_wal_stream_was_down(
    quiet_source, scratch_dir, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc
) -> None:
    source = quiet_source
    directory = tmp_path_factory.mktemp("down")
    before = {int(x) for x in source.psql("SELECT id FROM marks").split()}
    with streamed_target(directory, source, s3_endpoint, rabbit_url, control_db_odbc) as (settings, ctx):
        take_backup(ctx, "full")
        source.psql("INSERT INTO marks VALUES (200)")
        wait_for(
            lambda: plan_restore(ctx.repository, "main", None).stop.commit is not None,
            timeout=30,
            what="the commit after the full to be archived",
        )
    # The streamer is down: the differential's WAL is not archived.
    source.psql("INSERT INTO marks VALUES (201)")
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(take_backup(ctx, "diff")))
    worker.start()
    worker.join(timeout=120)
    assert outcome and outcome[0].startswith("diff backup "), outcome

    plan = plan_restore(ctx.repository, "main", None)
    assert plan.diff is None  # its WAL is not archived: full + archived WAL instead
    assert any("consistency point" in s and "is not archived" in s for s in plan.skipped), plan.skipped
    ids, _ = restored_ids(ctx, scratch_dir)
    assert ids == before | {200}
    listed = run_cli(settings, "backups", "list", "--target", "main")
    assert "not restorable" in listed.stdout, listed.stdout
