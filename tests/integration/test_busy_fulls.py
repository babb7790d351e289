"""Full backups of a busy database: WAL switched and checkpointed every half second, a small max_wal_size,
so the backup's start WAL is recycled long before the copy ends. Every full must succeed and restore, and
two fulls of one target at once must both succeed."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import worker_context

from workers.engines.postgresql.basebackup import restore_full
from workers.engines.postgresql.cluster import ClusterError, PgCluster, free_port
from workers.engines.registry import engine_for

pytestmark = pytest.mark.integration

BUSY_CONF = "checkpoint_timeout = 30s\nmax_wal_size = 32MB\nmin_wal_size = 32MB\n"
BLOB_ROWS = 100_000  # about 200 MiB of incompressible rows
# Fulls read the data directory (parts) where the worker runs on the database host, else pg_basebackup;
# how many fulls of each run through the churn (pg_basebackup's path has had five a run since 2026-11).
REPEATS = {"files": 5, "stream": 2}
METHODS = tuple(REPEATS)


@pytest.fixture(scope="module")
def busy_cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    cluster = PgCluster(scratch_dir / f"busy-{uuid.uuid4().hex[:6]}", free_port(), tcp=True)
    cluster.initdb(extra_conf=BUSY_CONF)
    cluster.start()
    cluster.psql(
        "CREATE TABLE blobs AS SELECT g AS id,"
        " string_agg(decode(md5(random()::text), 'hex'), ''::bytea) AS body"
        f" FROM generate_series(1, {BLOB_ROWS}) g, generate_series(1, 128) r GROUP BY g"
    )
    cluster.psql("CREATE TABLE churn (id bigserial PRIMARY KEY, note text NOT NULL)")
    yield cluster
    cluster.destroy()


@contextmanager
def churning(cluster: PgCluster) -> Iterator[list[int]]:
    """Rows inserted, the WAL switched and a checkpoint forced every half second until the block ends."""
    stop, rounds = threading.Event(), [0]

    def churn() -> None:
        while not stop.wait(0.5):
            try:
                cluster.psql(
                    "INSERT INTO churn (note) SELECT md5(random()::text) FROM generate_series(1, 2000);"
                    " SELECT pg_switch_wal(); CHECKPOINT;"
                )
                rounds[0] += 1
            except ClusterError:
                return

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield rounds
    finally:
        stop.set()
        thread.join(timeout=60)


def _restored_rows(manifest: dict, repo, into: Path) -> int:
    restore_full(repo, manifest, into)
    restored = PgCluster(into, free_port())
    restored.start()
    try:
        return int(restored.psql("SELECT count(*) FROM blobs").strip())
    finally:
        restored.destroy()


@pytest.mark.parametrize("method", METHODS)
def test_fulls_of_a_busy_database_succeed_and_restore_though_their_start_wal_is_recycled(
    make_settings, busy_cluster: PgCluster, scratch_dir: Path, method: str
) -> None:
    ctx = worker_context(make_settings(target=busy_cluster, target_options=f'full_method = "{method}"'))
    engine = engine_for(ctx.settings.target("main"))
    for attempt in range(REPEATS[method]):
        # Given a database whose WAL is switched and checkpointed every half second
        with churning(busy_cluster) as rounds:
            # When a full backup runs through it
            result = engine.full_backup(
                ctx.repository,
                backup_id=f"2026120{attempt + 1}T000000Z-full",
                job_key=f"busy:{uuid.uuid4().hex}",
                event_id=str(uuid.uuid4()),
            )
        # Then it commits (the churn recycled WAL during it) and restores with every row
        assert result.created and rounds[0] >= 2, (attempt, rounds)
        assert (result.manifest.get("layout") == "parts") == (method == "files")
        # and the slot that held its WAL is gone with its session
        assert busy_cluster.psql("SELECT count(*) FROM pg_replication_slots").strip() == "0"
        into = scratch_dir / f"busy-restore-{uuid.uuid4().hex[:6]}"
        assert _restored_rows(result.manifest, ctx.repository, into) == BLOB_ROWS


@pytest.mark.parametrize("method", METHODS)
def test_two_fulls_of_one_busy_target_at_once_both_succeed(
    make_settings, busy_cluster: PgCluster, scratch_dir: Path, method: str
) -> None:
    ctx = worker_context(make_settings(target=busy_cluster, target_options=f'full_method = "{method}"'))
    engine = engine_for(ctx.settings.target("main"))
    results: dict[str, object] = {}

    def full(backup_id: str) -> None:
        try:
            results[backup_id] = engine.full_backup(
                ctx.repository, backup_id=backup_id, job_key=f"busy:{backup_id}", event_id=str(uuid.uuid4())
            )
        except Exception as e:  # the assertion below reports it
            results[backup_id] = e

    # When two fulls of the same busy target run at the same time
    with churning(busy_cluster):
        threads = [threading.Thread(target=full, args=(f"2026121{i}T000000Z-full",)) for i in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)

    # Then both commit, and both restore
    for backup_id, result in sorted(results.items()):
        assert not isinstance(result, Exception), f"{backup_id}: {result}"
        into = scratch_dir / f"busy-restore-{uuid.uuid4().hex[:6]}"
        assert _restored_rows(result.manifest, ctx.repository, into) == BLOB_ROWS
    assert len(results) == 2
