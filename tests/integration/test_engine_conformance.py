"""One suite every database engine passes, run against a real server of that engine.

Parametrised over the engine registry: a new engine gets a harness here (how to start a throwaway
server of it and look inside with SQL) and must then pass every test unchanged. The tests call only
the engine interface (`workers.engines.base.Engine`); the harness alone knows the engine.

One history is made per engine: rows A, full backup, rows B, differential, rows that only the log holds,
moment T, rows C, log backup. Each test then checks one promise of the interface against it.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import build_settings, worker_context

from deskvault_core.config import Settings
from workers.context import WorkerContext
from workers.engines.base import Engine, ScratchServer, Unreachable
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.engines.registry import ENGINES, engine_for
from workers.repository import catalog
from workers.repository.keyring import Keyring

pytestmark = pytest.mark.integration

DATABASE = "conformance_tenant"
ROWS_A, ROWS_B, ROWS_WAL, ROWS_C = range(0, 5), range(5, 10), range(10, 15), range(15, 20)


class PostgresHarness:
    """A PostgreSQL 15 cluster of its own, run as the postgres user, looked at through psql."""

    def __init__(self, root: Path) -> None:
        self.cluster = PgCluster(root / "pg", free_port(), tcp=True)

    def start(self) -> PgCluster:
        self.cluster.initdb()
        self.cluster.start()
        return self.cluster

    def stop(self) -> None:
        self.cluster.destroy()

    def execute(self, sql: str, database: str = "postgres", server: ScratchServer | None = None) -> str:
        cluster = self.cluster if server is None else server
        assert isinstance(cluster, PgCluster)
        return cluster.psql(sql, database).strip()

    def dumped_tables(self, dump: bytes, scratch: Path) -> set[str]:
        """The tables a dump would restore, as pg_restore lists them."""
        path = scratch / f"{uuid.uuid4().hex}.dump"
        path.write_bytes(dump)
        listing = subprocess.run(
            [str(self.cluster.pg_bin / "pg_restore"), "--list", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {line.split()[-2] for line in listing.splitlines() if " TABLE public " in line}


HARNESSES = {"postgresql": PostgresHarness}


@dataclass
class History:
    engine: Engine
    harness: PostgresHarness
    ctx: WorkerContext
    full: dict
    diff: dict
    log: dict
    moment: datetime  # after rows A, B and the log-only rows committed, before rows C


def _write(harness: PostgresHarness, ids: range) -> None:
    for i in ids:
        harness.execute(f"INSERT INTO marks VALUES ({i}, 'row {i}')", DATABASE)


def _settings(root: Path, request: pytest.FixtureRequest, target: PgCluster) -> Settings:
    key_file = root / "keys.json"
    Keyring.create(key_file)
    return build_settings(
        root,
        key_file,
        request.getfixturevalue("s3_endpoint"),
        request.getfixturevalue("rabbit_url"),
        request.getfixturevalue("control_db_odbc"),
        target,
    )


@pytest.fixture(scope="module", params=sorted(ENGINES))
def history(request: pytest.FixtureRequest, scratch_dir: Path) -> Iterator[History]:
    root = scratch_dir / f"conformance-{request.param}-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    harness = HARNESSES[request.param](root)
    live = harness.start()
    harness.execute(f"CREATE DATABASE {DATABASE}")
    harness.execute("CREATE TABLE marks (id int PRIMARY KEY, note text NOT NULL)", DATABASE)
    ctx = worker_context(_settings(root, request, live))
    target = ctx.settings.target("main")
    engine = engine_for(target)
    assert engine.name == request.param == target.engine
    stop = threading.Event()
    streamer = engine.log_streamer(ctx.repository, root / "spool", 1.0)
    thread = threading.Thread(target=streamer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        _write(harness, ROWS_A)
        time.sleep(2)  # files changed within a second of a full's start all go into its first differential
        ids = {"job_key": f"conformance:{uuid.uuid4().hex}", "event_id": str(uuid.uuid4())}
        full = engine.full_backup(ctx.repository, backup_id="20261201T000000Z-full", **ids).manifest
        _write(harness, ROWS_B)
        diff = engine.diff_backup(
            ctx.repository, backup_id="20261201T010000Z-diff", full=full, **ids
        ).manifest
        _write(harness, ROWS_WAL)
        time.sleep(1.5)
        moment = datetime.now(UTC)
        time.sleep(1.5)
        _write(harness, ROWS_C)
        fulls = [m for m in catalog.list_manifests(ctx.repository, "main") if m["kind"] == "full"]
        log = engine.log_backup(ctx.repository, backup_id="20261201T020000Z-log", fulls=fulls, **ids).manifest
        yield History(engine, harness, ctx, full, diff, log, moment)
    finally:
        stop.set()
        thread.join(timeout=30)
        harness.stop()


def _rows(history: History, server: ScratchServer | None = None) -> int:
    return int(history.harness.execute("SELECT count(*) FROM marks", DATABASE, server))


def test_every_registered_engine_has_a_harness() -> None:
    assert sorted(HARNESSES) == sorted(ENGINES)


def test_a_full_backup_commits_once_and_describes_itself(history: History) -> None:
    full = history.full
    assert (full["kind"], full["engine"], full["parent"]) == ("full", history.engine.name, None)
    assert full["objects"] and full["plain_size"] > 0
    again = history.engine.full_backup(
        history.ctx.repository, backup_id=full["backup_id"], job_key="other", event_id=str(uuid.uuid4())
    )
    assert (again.created, again.manifest) == (False, full)


def test_a_differential_extends_its_full_and_is_smaller(history: History) -> None:
    diff = history.diff
    assert (diff["kind"], diff["parent"], diff["engine"]) == (
        "diff",
        history.full["backup_id"],
        history.engine.name,
    )
    assert 0 < diff["plain_size"] < history.full["plain_size"]


def test_the_log_backup_covers_the_chain_without_gaps(history: History) -> None:
    assert (history.log["kind"], history.log["parent"]) == ("log", history.full["backup_id"])
    manifests = catalog.list_manifests(history.ctx.repository, "main")
    archive = history.engine.log_archive(history.ctx.repository, manifests)
    timeline, start, stop = archive.span(history.full)
    assert start <= stop
    newest = max(f.position for f in archive.files if f.position is not None and f.timeline == timeline)
    assert newest > stop  # the log backup's own switch is archived after the full's
    assert archive.first_gap(timeline, start, newest) is None
    assert archive.gaps() == []
    assert all(f.key.startswith(archive.prefix) for f in archive.files)


def test_the_window_spans_the_history_and_refuses_what_lies_outside(history: History) -> None:
    window = history.engine.plan_restore(history.ctx.repository, None).window
    assert window.earliest <= history.moment <= window.latest
    for outside in (window.earliest - timedelta(seconds=1), datetime.now(UTC) + timedelta(hours=1)):
        with pytest.raises(Unreachable):
            history.engine.plan_restore(history.ctx.repository, outside)


def test_a_restore_to_a_moment_holds_exactly_what_was_committed_by_then(history: History) -> None:
    engine = history.engine
    plan = engine.plan_restore(history.ctx.repository, history.moment)
    assert plan.diff is not None and plan.diff["backup_id"] == history.diff["backup_id"]
    assert plan.log_files >= 1
    with engine.scratch_server("conformance") as server:
        result = engine.restore(history.ctx.repository, plan, server.datadir, start=True, port=server.port)
        assert result.recovery_target == history.moment  # a commit after it is archived: stop there
        assert result.reached is not None and result.reached <= history.moment
        assert _rows(history, server) == len(ROWS_A) + len(ROWS_B) + len(ROWS_WAL)


def test_the_latest_restore_lists_probes_and_dumps_like_the_live_target(history: History) -> None:
    engine = history.engine
    plan = engine.plan_restore(history.ctx.repository, None)
    with engine.scratch_server("conformance") as server:
        folder = server.datadir.parent
        engine.restore(history.ctx.repository, plan, server.datadir, start=True, port=server.port)
        assert _rows(history, server) == len(ROWS_A) + len(ROWS_B) + len(ROWS_WAL) + len(ROWS_C)
        assert DATABASE in engine.list_databases(server)
        assert engine.list_databases(server) == engine.list_databases()
        findings = engine.probe(server)
        assert any(DATABASE in f for f in findings), findings
        dump = b"".join(engine.dump_database(DATABASE, server))
    assert not folder.exists()  # the scratch server went, folder and all
    with tempfile.TemporaryDirectory() as scratch:
        assert "marks" in history.harness.dumped_tables(dump, Path(scratch))


def test_a_dump_of_the_live_target_holds_the_tenant_database(history: History) -> None:
    dump = b"".join(history.engine.dump_database(DATABASE))
    with tempfile.TemporaryDirectory() as scratch:
        assert history.harness.dumped_tables(dump, Path(scratch)) == {"marks"}


def test_dropping_a_database_is_reported_once(history: History) -> None:
    name = f"doomed_{uuid.uuid4().hex[:8]}"
    history.harness.execute(f"CREATE DATABASE {name}")
    assert name in history.engine.list_databases()
    assert history.engine.drop_database(name) is True
    assert history.engine.drop_database(name) is False
    assert name not in history.engine.list_databases()
