"""A deskvault process killed outright (kill -9, the OOM killer) leaves no process of its behind: a worker
process left running would go on taking events, a pg_receivewal would hold the slot the next streamer
needs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import process_alive, start_deskvault, tenants_cluster, wait_for, worker_context

from workers.engines.postgresql.cluster import PgCluster

pytestmark = pytest.mark.integration


def _children(pid: int, at_least: int) -> list[int] | None:
    """`pid`'s children (started by any of its threads), once there are `at_least` of them."""
    tasks = Path(f"/proc/{pid}/task").glob("*/children")
    found = [int(c) for task in tasks for c in task.read_text().split()]
    return found if len(found) >= at_least else None


def _receivers(pid: int) -> list[int] | None:
    """`pid`'s children that run pg_receivewal (by then past the step that exec'd it)."""
    found = []
    for child in _children(pid, 1) or []:
        try:
            if Path(f"/proc/{child}/exe").resolve().name == "pg_receivewal":
                found.append(child)
        except OSError:
            continue  # a short-lived helper that ended meanwhile
    return found or None


def _killed_leaves_none(process: subprocess.Popen, children: list[int]) -> None:
    """Kill `process` outright, then see every one of `children` stop."""
    process.kill()
    process.wait(timeout=10)
    wait_for(lambda: not any(process_alive(pid) for pid in children), timeout=30, what=f"{children} to stop")


@pytest.fixture
def own_target(scratch_dir: Path) -> Iterator[PgCluster]:
    """A target of this test's own: the streamer's slot is made on it."""
    cluster = tenants_cluster(scratch_dir, "killed", ())
    yield cluster
    cluster.destroy()


def test_a_worker_killed_outright_takes_its_worker_processes_with_it(make_settings) -> None:
    # Given `deskvault worker` running two worker processes
    settings = make_settings()
    worker_context(settings)
    command = [sys.executable, "-m", "deskvault.cli", "--config", str(settings.source), "worker"]
    parent = subprocess.Popen([*command, "--pool", "lifecycle", "--processes", "2", "--no-metrics"])
    try:
        pids = wait_for(lambda: _children(parent.pid, 2), timeout=60, what="the worker processes to start")
        # When it is killed outright, then its worker processes stop too
        _killed_leaves_none(parent, pids)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_streamer_killed_outright_releases_the_slot_for_the_next(
    make_settings, own_target: PgCluster, tmp_path: Path
) -> None:
    # Given the WAL streaming from a target through pg_receivewal
    settings = make_settings(target=own_target)
    worker_context(settings)
    streamer = start_deskvault(settings, tmp_path / "wal.log", "wal-stream", "--no-metrics")
    streaming = "SELECT count(*) FROM pg_stat_replication"
    try:
        wait_for(
            lambda: own_target.psql(streaming).strip() == "1", timeout=60, what="the streamer to connect"
        )
        (receiver,) = wait_for(lambda: _receivers(streamer.pid), what="pg_receivewal to be running")
        # When the streamer is killed outright, then its pg_receivewal stops and lets the slot go
        _killed_leaves_none(streamer, [receiver])
        wait_for(lambda: own_target.psql(streaming).strip() == "0", timeout=30, what="the slot to be free")
        # And the next streamer takes it
        streamer = start_deskvault(settings, tmp_path / "wal2.log", "wal-stream", "--no-metrics")
        wait_for(lambda: own_target.psql(streaming).strip() == "1", timeout=60, what="the next streamer")
    finally:
        if streamer.poll() is None:
            streamer.terminate()
            streamer.wait(timeout=60)


def test_a_partial_segment_cut_short_by_a_kill_does_not_stop_the_next_streamer(
    make_settings, own_target: PgCluster, tmp_path: Path
) -> None:
    # Given the spool as a pg_receivewal killed while it made a new segment leaves it: the segment's
    # `.partial` shorter than a segment (pg_receivewal refuses it, "should be 0 or 16777216")
    settings = make_settings(target=own_target)
    worker_context(settings)
    segment = own_target.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()
    spool = Path(settings.wal.spool_dir) / "main"
    spool.mkdir(parents=True)
    (spool / f"{segment}.partial").write_bytes(bytes(3_276_800))
    # When a streamer starts, then it streams, into that segment padded to its full size
    streamer = start_deskvault(settings, tmp_path / "wal.log", "wal-stream", "--no-metrics")
    streaming = "SELECT count(*) FROM pg_stat_replication"
    try:
        wait_for(
            lambda: own_target.psql(streaming).strip() == "1", timeout=60, what="the streamer to connect"
        )
        assert "was cut short at 3276800 bytes" in (tmp_path / "wal.log").read_text()
    finally:
        streamer.terminate()
        streamer.wait(timeout=60)
