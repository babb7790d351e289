"""Restore as a person runs it: relative folders, ports, progress, and failures that say why.

One small source cluster with one full backup and its WAL streamed serves every test, so each test is
a restore of a few seconds. Tests that damage the archive put it back before they end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import free_port, marks_cluster, run_cli, streamed_target, take_backup, wait_for

from messages.events import RestoreDrill
from workers.context import WorkerContext
from workers.engines.postgresql.cluster import PgCluster
from workers.engines.postgresql.restore import plan_restore
from workers.engines.postgresql.walarchive import list_wal
from workers.engines.postgresql.walnames import DEFAULT_SEGMENT_SIZE
from workers.handlers.drill import handle_restore_drill

pytestmark = pytest.mark.integration

BUSY_PORT = 5439  # the port `restore --start` used whatever else listened there
RUNNING_RE = re.compile(r"recovered and running on port (\d+)")
ROWS = {1, 2, 3, 4, 5}


@pytest.fixture(scope="module")
def source(scratch_dir: Path) -> Iterator[PgCluster]:
    with marks_cluster(scratch_dir, "usability", commit_timestamps=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def backed_up(source: PgCluster, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc):
    """Given rows 1-3 in a full backup and rows 4-5 only in the WAL streamed after it."""
    directory = tmp_path_factory.mktemp("usability")
    with streamed_target(directory, source, s3_endpoint, rabbit_url, control_db_odbc) as (settings, ctx):
        source.psql("INSERT INTO marks VALUES (1), (2), (3)")
        assert take_backup(ctx, "full").startswith("full backup ")
        source.psql("INSERT INTO marks VALUES (4)")
        source.psql("INSERT INTO marks VALUES (5)")
        # Their segment, completed at once, reaches the archive within a second or two.
        segment = source.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()
        source.psql("SELECT pg_switch_wal()")
        wait_for(
            lambda: any(e.filename == segment for e in list_wal(ctx.repository, "main")),
            what="the last commit to reach the archive",
        )
        yield settings, ctx


def folder(scratch_dir: Path) -> Path:
    """A new folder the postgres user can reach, for one test's restore."""
    path = scratch_dir / f"usability-restore-{uuid.uuid4().hex[:6]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def rows_on(into: Path, port: int) -> set[int]:
    return {int(x) for x in PgCluster(into, port).psql("SELECT id FROM marks").split()}


@contextlib.contextmanager
def port_taken(port: int) -> Iterator[None]:
    """Something listening on 127.0.0.1:`port` for the block (if another program already does, that)."""
    with socket.socket() as s:
        with contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            s.listen()
        yield


@contextlib.contextmanager
def base_wal_zeroed(ctx: WorkerContext) -> Iterator[str]:
    """The WAL segment holding the full backup's checkpoint replaced, validly encrypted, by zeros: the
    archive serves bytes PostgreSQL cannot use (what a recycled segment archived by mistake looks like).
    Yields the segment's file name; puts the real one back afterwards."""
    first = plan_restore(ctx.repository, "main", None).wal[0]
    original = b"".join(ctx.repository.get_stream(first.key))
    ctx.repository.put_stream(first.key, [bytes(DEFAULT_SEGMENT_SIZE)])
    try:
        yield first.filename
    finally:
        ctx.repository.put_stream(first.key, [original])


def test_a_restore_into_a_relative_folder_starts_and_holds_every_row(backed_up, scratch_dir) -> None:
    settings, _ = backed_up
    cwd = folder(scratch_dir)

    result = run_cli(settings, "restore", "--target", "main", "--into", "rel/dir", "--start", cwd=cwd)

    assert result.returncode == 0, result.stdout + result.stderr
    into = cwd / "rel" / "dir"
    try:
        port = int(RUNNING_RE.search(result.stdout).group(1))
        assert rows_on(into, port) == ROWS
        assert str(cwd / "rel" / "dir.wal") in (into / "postgresql.auto.conf").read_text()
    finally:
        PgCluster(into, 0).stop("immediate")


def test_without_port_a_free_one_is_picked_and_printed(backed_up, scratch_dir) -> None:
    settings, _ = backed_up
    into = folder(scratch_dir) / "data"

    with port_taken(BUSY_PORT):
        result = run_cli(settings, "restore", "--target", "main", "--into", str(into), "--start")

    assert result.returncode == 0, result.stdout + result.stderr
    try:
        port = int(RUNNING_RE.search(result.stdout).group(1))
        assert port != BUSY_PORT
        assert rows_on(into, port) == ROWS
    finally:
        PgCluster(into, 0).stop("immediate")


def test_a_busy_port_given_is_refused_before_anything_is_downloaded(backed_up, scratch_dir) -> None:
    settings, _ = backed_up
    into = folder(scratch_dir) / "data"

    with port_taken(BUSY_PORT):
        result = run_cli(
            settings, "restore", "--target", "main", "--into", str(into), "--start", "--port", str(BUSY_PORT)
        )

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--port {BUSY_PORT}" in result.stderr and "in use" in result.stderr
    assert "restoring base backup" not in result.stdout
    assert not into.exists() and not into.with_name("data.wal").exists()


def test_once_recovered_the_wal_folder_is_removed(backed_up, scratch_dir) -> None:
    settings, _ = backed_up
    into = folder(scratch_dir) / "data"

    result = run_cli(settings, "restore", "--target", "main", "--into", str(into), "--start")

    assert result.returncode == 0, result.stdout + result.stderr
    try:
        wal_dir = into.with_name("data.wal")
        assert not wal_dir.exists()
        assert str(wal_dir) not in result.stdout  # the message does not point at it
        assert rows_on(into, int(RUNNING_RE.search(result.stdout).group(1))) == ROWS
    finally:
        PgCluster(into, 0).stop("immediate")


def test_the_base_shows_progress_and_without_start_the_wal_stays(backed_up, scratch_dir) -> None:
    settings, _ = backed_up
    into = folder(scratch_dir) / "data"

    result = run_cli(settings, "restore", "--target", "main", "--into", str(into))

    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if "MiB/s" in line]
    assert progress and re.search(r"base: [\d.]+ of [\d.]+ MiB \(100%\), [\d.]+ MiB/s", progress[-1])
    wal_dir = into.with_name("data.wal")
    assert wal_dir.is_dir() and f"WAL in {wal_dir}" in result.stdout  # the server reads it at first start


def test_a_failed_start_keeps_the_server_log_and_shows_its_end(backed_up, scratch_dir) -> None:
    settings, ctx = backed_up
    into = folder(scratch_dir) / "data"

    with base_wal_zeroed(ctx):
        result = run_cli(settings, "restore", "--target", "main", "--into", str(into), "--start")

    assert result.returncode == 1, result.stdout + result.stderr
    log_file = into.with_name("data.log")
    assert str(log_file) in result.stderr
    assert log_file.is_file()
    fatal = [line for line in log_file.read_text().splitlines() if "FATAL:" in line]
    assert fatal and fatal[-1].strip() in result.stderr
    assert not into.exists()  # no half-restored folder that someone might start


def test_a_failed_drill_keeps_the_server_log_and_reports_it(backed_up) -> None:
    _, ctx = backed_up
    event = RestoreDrill.new(
        target="main",
        slot=datetime.now(UTC).replace(second=0, microsecond=0),
        idempotency_key=f"drill-{uuid.uuid4().hex}",
    )

    with base_wal_zeroed(ctx):
        outcome = handle_restore_drill(ctx, event)

    assert outcome.startswith("drill FAILED: ")
    kept = Path(re.search(r"server log (\S+deskvault-drill-logs/\S+\.log)", outcome).group(1))
    assert kept.is_file() and "FATAL:" in kept.read_text()
    assert "FATAL:" in outcome
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and kept.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700 and kept.parent.stat().st_uid == os.geteuid()
    assert str(kept) in ctx.ledger.drills("main")[-1]["detail"]
    kept.unlink()


def test_stopping_a_server_that_ended_on_its_own_is_not_an_error(scratch_dir) -> None:
    # A restore's server can die replaying (a WAL file that never came) just as the restore's cleanup
    # stops it: the stop must not fail, or its error hides the one that says why the restore failed.
    cluster = PgCluster(scratch_dir / f"ended-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb()
    cluster.start()
    try:
        pid = int((cluster.datadir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the killed postmaster to go")
        assert (cluster.datadir / "postmaster.pid").exists()  # stale, as a crash leaves it
        cluster.stop("immediate")
    finally:
        cluster.destroy()
    assert not cluster.datadir.exists()


def test_restore_verify_and_expire_print_json_for_scripts_and_progress_apart(backed_up, scratch_dir) -> None:
    settings, _ = backed_up
    into = folder(scratch_dir) / "data"

    # restore --start --json: stdout is one JSON object, the progress went to stderr
    restored = run_cli(settings, "restore", "--target", "main", "--into", str(into), "--start", "--json")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    try:
        result = json.loads(restored.stdout)
        assert "MiB/s" in restored.stderr and "MiB/s" not in restored.stdout
        assert (result["target"], result["into"], result["started"]) == ("main", str(into), True)
        assert result["full"] and result["log_files"] >= 1 and result["reached"]
        assert result["window"] and all(len(interval) == 2 for interval in result["window"])
        assert rows_on(into, result["port"]) == ROWS  # the port it names is the server's
        assert stat.S_IMODE(os.stat(result["socket_dir"]).st_mode) == 0o700
    finally:
        PgCluster(into, 0).stop("immediate")

    # backups verify --json: the verdict and the objects read
    verified = run_cli(settings, "backups", "verify", "--target", "main", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    verdict = json.loads(verified.stdout)
    assert verdict["ok"] is True and verdict["problems"] == [] and verdict["objects"] > 0
    assert "objects checked" in verified.stderr

    # backups expire --dry-run --json: what would go, nothing deleted
    expired = run_cli(settings, "backups", "expire", "--target", "main", "--dry-run", "--json")
    assert expired.returncode == 0, expired.stdout + expired.stderr
    plan = json.loads(expired.stdout)
    assert (plan["target"], plan["dry_run"], plan["deleted"]) == ("main", True, 0)
    assert isinstance(plan["lines"], list)
