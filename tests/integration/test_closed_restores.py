"""A restored cluster holds every row of its source: no other local user may reach it. Tried as the
attacker would, as `nobody` with a shell on the restore host: connecting over TCP and over the socket,
reading the data directory and the restored WAL, and through a server started by hand with the
backed-up settings. Real PostgreSQL, real SeaweedFS, the restore run as root."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import marks_cluster, run_cli, streamed_target, take_backup

from workers.engines.postgresql.cluster import DEFAULT_PG_BIN, PgCluster, free_port, server_user
from workers.engines.postgresql.probe import probe
from workers.engines.postgresql.restore import SOURCE_HBA, plan_restore, restore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="acts as another local user (runuser)"),
]

PSQL = str(DEFAULT_PG_BIN / "psql")


@pytest.fixture(scope="module")
def backed_up(scratch_dir: Path, tmp_path_factory, s3_endpoint, rabbit_url, control_db_odbc):
    with marks_cluster(scratch_dir, "closed", commit_timestamps=False) as source:
        directory = tmp_path_factory.mktemp("closed")
        with streamed_target(directory, source, s3_endpoint, rabbit_url, control_db_odbc) as (settings, ctx):
            source.psql("INSERT INTO marks VALUES (1), (2)")
            source.psql('CREATE TABLE "ticket replies" (id int); INSERT INTO "ticket replies" VALUES (1)')
            assert take_backup(ctx, "full").startswith("full backup ")
            yield settings, ctx


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    command = ["runuser", "-u", "nobody", "--", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def nobody_query(host: str, port: int, user: str = "postgres") -> subprocess.CompletedProcess:
    return as_nobody(PSQL, "-X", "-At", "-h", host, "-p", str(port), "-U", user, "-c", "SELECT 1")


def open_modes(*trees: Path) -> list[str]:
    """Every entry under `trees` that its group or others may read, write or enter (links aside)."""
    found = []
    for tree in trees:
        for path in [tree, *tree.rglob("*")]:
            info = path.lstat()
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                found.append(f"{path} {oct(stat.S_IMODE(info.st_mode))}")
    return found


@pytest.fixture
def started(backed_up, scratch_dir: Path) -> Iterator[tuple[Path, int, Path]]:
    """`deskvault restore --start`, as an operator runs it: (data directory, port, socket folder)."""
    settings, _ = backed_up
    into = scratch_dir / f"closed-{uuid.uuid4().hex[:6]}" / "data"
    into.parent.mkdir(mode=0o755)
    port = free_port()
    result = run_cli(
        settings, "restore", "--target", "main", "--into", str(into), "--start", "--port", str(port)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cluster = PgCluster(into, port)
    socket_dir = cluster.socket_dir
    assert f"psql -h {socket_dir} -p {port} -U postgres" in result.stdout
    try:
        yield into, port, socket_dir
    finally:
        cluster.stop("immediate")


def test_nobody_can_reach_a_cluster_restore_start_runs(started) -> None:
    into, port, socket_dir = started
    # root, as deskvault, can
    assert PgCluster(into, port).psql("SELECT count(*) FROM marks").strip() == "2"
    # nobody can neither connect over TCP (nothing listens there) nor over the socket
    tcp = nobody_query("127.0.0.1", port)
    assert tcp.returncode != 0 and "Connection refused" in tcp.stderr, tcp.stderr
    local = nobody_query(str(socket_dir), port)
    assert local.returncode != 0 and "Permission denied" in local.stderr, local.stderr
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    # nor read a file of it, nor list it
    assert as_nobody("cat", str(into / "PG_VERSION")).returncode != 0
    assert as_nobody("ls", str(into)).returncode != 0
    assert open_modes(into) == []
    owner = socket_dir.stat().st_uid
    assert {p.stat().st_uid for p in (into, into / "base", into / "PG_VERSION")} == {owner}
    # and the backed-up access rules are kept aside, unused
    assert (into / SOURCE_HBA).exists() and "trust" in (into / SOURCE_HBA).read_text()
    assert "host" not in "".join(
        line for line in (into / "pg_hba.conf").read_text().splitlines() if not line.startswith("#")
    )


def test_a_drills_probe_reaches_it_and_counts_a_table_whose_name_has_spaces(started) -> None:
    into, port, _ = started
    findings = probe(PgCluster(into, port))
    assert 'postgres: public."ticket replies"=1, public.marks=2' in findings or (
        'postgres: public.marks=2, public."ticket replies"=1' in findings
    ), findings


def test_a_restore_not_started_keeps_its_files_and_wal_to_the_servers_user(backed_up, scratch_dir) -> None:
    _, ctx = backed_up
    into = scratch_dir / f"closed-{uuid.uuid4().hex[:6]}" / "data"
    into.parent.mkdir(mode=0o755)
    result = restore(ctx.repository, plan_restore(ctx.repository, "main", None), into)
    wal_files = [p for p in result.log_dir.iterdir() if len(p.name) == 24]
    assert wal_files, "the restored WAL is laid out beside the data directory"
    assert open_modes(into, result.log_dir) == []
    assert as_nobody("cat", str(wal_files[0])).returncode != 0
    assert as_nobody("ls", str(result.log_dir)).returncode != 0


def test_started_by_hand_with_its_backed_up_settings_it_still_refuses_other_users(
    backed_up, scratch_dir
) -> None:
    _, ctx = backed_up
    into = scratch_dir / f"closed-{uuid.uuid4().hex[:6]}" / "data"
    into.parent.mkdir(mode=0o755)
    restore(ctx.repository, plan_restore(ctx.repository, "main", None), into)
    sockets = scratch_dir / f"open-sockets-{uuid.uuid4().hex[:6]}"
    sockets.mkdir(mode=0o777)
    sockets.chmod(0o777)  # a socket folder anyone can enter, like /var/run/postgresql
    port = free_port()
    # Given an operator who starts it as the docs say, listening on TCP and on an open socket
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={sockets}"
    log = sockets / "by-hand.log"  # (a folder the server's user may write in)
    pg_ctl = [str(DEFAULT_PG_BIN / "pg_ctl"), "-D", str(into), "-l", str(log), "-o", options, "-w", "start"]
    subprocess.run(["runuser", "-u", server_user(), "--", *pg_ctl], check=True, capture_output=True, cwd="/")
    try:
        # Then nobody is refused both ways, by the restore's own access rules
        tcp = nobody_query("127.0.0.1", port)
        assert tcp.returncode != 0 and "no pg_hba.conf entry" in tcp.stderr, tcp.stderr
        local = nobody_query(str(sockets), port)
        assert local.returncode != 0 and "authentication failed" in local.stderr, local.stderr
    finally:
        PgCluster(into, port).stop("immediate")
