"""One database restored alone from a full and a differential in parts: only its parts (and the
cluster's) are downloaded and laid out, and replay of WAL that changes every database (a first vacuum
without checksums, growth, truncation, a dropped database) still ends exactly at the planned stop, with
exactly that database's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import take_backup, tenants_cluster, wait_for, wal_streaming, worker_context

from deskvault.local.demo_data import TABLES, helpdesk_sql, table_fingerprint_sql
from workers.engines.postgresql import parts
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.engines.postgresql.restore import plan_restore, restore
from workers.engines.postgresql.subset import subset_for

pytestmark = pytest.mark.integration

TENANTS = ("s_alpha", "s_beta", "s_gamma")
CHURN = (
    # A first vacuum of a table untouched since the backup: it marks pages all-visible with records
    # that name them without an image (no checksums, no wal_log_hints), which replay cannot apply to a
    # missing file. Then growth past the backups' sizes, updates, deletes and a truncating vacuum.
    "VACUUM quiet",
    "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 30000) g",
    "UPDATE big SET v = v || 'x' WHERE g % 5 = 0",
    "DELETE FROM big WHERE g % 7 = 0",
    "VACUUM big",
    "DELETE FROM replies",
    "VACUUM replies",
)


@pytest.fixture(scope="module")
def cluster(scratch_dir: Path) -> Iterator[PgCluster]:
    # Without checksums: initdb's default, and the harder case for replay (see CHURN)
    source = tenants_cluster(scratch_dir, "subset", TENANTS, checksums=False)
    for tenant in TENANTS:
        source.psql(
            "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 7)::text) AS v"
            " FROM generate_series(1, 40000) g",
            tenant,
        )
        source.psql(
            "CREATE TABLE quiet WITH (autovacuum_enabled = off) AS"
            " SELECT g, md5(g::text) AS v FROM generate_series(1, 20000) g",
            tenant,
        )
    source.psql("CHECKPOINT")
    yield source
    source.destroy()


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts, "PART_BYTES", 2**20)


def _fingerprint(cluster: PgCluster, database: str) -> dict[str, str]:
    found = {t: cluster.psql(table_fingerprint_sql(t), database).strip() for t in TABLES}
    found["big"] = cluster.psql("SELECT count(*) || ':' || sum(length(v)) FROM big", database).strip()
    return found


def _oid(cluster: PgCluster, database: str) -> int:
    return int(cluster.psql(f"SELECT oid FROM pg_database WHERE datname = '{database}'").strip())


def test_one_database_restores_alone_while_the_wal_changes_every_database(
    make_settings, cluster: PgCluster, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = worker_context(make_settings(target=cluster))
    with wal_streaming(ctx, connected=cluster):
        take_backup(ctx, "full")
        for tenant in TENANTS:
            cluster.psql(CHURN[1], tenant)
        cluster.psql("CREATE DATABASE s_late")
        cluster.psql(helpdesk_sql("s_late"), "s_late")
        take_backup(ctx, "diff")
        # After the differential: every database changes again, one is dropped, and s_beta loses rows
        for tenant in TENANTS:
            for statement in CHURN:
                cluster.psql(statement, tenant)
        cluster.psql("DROP DATABASE s_late")
        expected = _fingerprint(cluster, "s_beta")
        last = int(cluster.psql("SELECT txid_current()").strip())  # a commit of its own, the last
        cluster.psql("SELECT pg_switch_wal()")

        def archived() -> bool:
            commit = plan_restore(ctx.repository, "main", None).stop.commit
            return commit is not None and commit.xid == last

        wait_for(archived, timeout=60, what="the last commit to reach the archive")

    plan = plan_restore(ctx.repository, "main", None)
    assert plan.diff is not None
    subset = subset_for([plan.base, plan.diff], "s_beta")
    assert not isinstance(subset, str), subset
    beta = _oid(cluster, "s_beta")
    others = [_oid(cluster, t) for t in ("s_alpha", "s_gamma")]
    assert beta in subset.oids and not set(others) & subset.oids

    fetched: list[str] = []
    get_stream = ctx.repository.get_stream

    def recorded(key: str, **kwargs):
        fetched.append(key)
        return get_stream(key, **kwargs)

    monkeypatch.setattr(ctx.repository, "get_stream", recorded)
    into = scratch_dir / f"alone-{uuid.uuid4().hex[:6]}"
    said: list[str] = []
    restored = PgCluster(into, free_port())
    try:
        restore(
            ctx.repository,
            plan,
            into,
            start=True,
            port=restored.port,
            database="s_beta",
            on_progress=said.append,
        )
        # Exactly the tenant's rows at the stop, and the stop reached (restore checks it)
        assert _fingerprint(restored, "s_beta") == expected
        assert any("restoring database s_beta alone" in line for line in said), said
        # The scenario reaches what needed ignore_invalid_pages: records for pages left out
        (passed,) = [line for line in said if line.startswith("replay passed over")]
        assert int(passed.split()[3]) > 0, passed
    finally:
        restored.destroy()
    # Not one part of the other tenants' was downloaded; every part of s_beta's and the cluster's was
    groups = {o["key"]: o["group"] for b in (plan.base, plan.diff) for o in b["objects"]}
    fetched_groups = {groups[k] for k in fetched if k in groups}
    assert f"base/{beta}" in fetched_groups
    assert not {f"base/{oid}" for oid in others} & fetched_groups, fetched_groups
    kept = {k for k, group in groups.items() if subset.keeps(group)}
    assert kept <= set(fetched) and {groups[k] for k in kept} >= {"cluster", f"base/{beta}"}
