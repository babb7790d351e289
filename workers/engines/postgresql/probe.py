"""Checks of a restored, running PostgreSQL: what a restore drill proves besides that it started."""

from __future__ import annotations

import subprocess

from workers.engines.base import EngineError
from workers.engines.postgresql.cluster import PgCluster

TABLES_PROBED = 5


def probe(cluster: PgCluster) -> list[str]:
    """pg_amcheck on every database where installed, and exact row counts of each database's largest
    tables; EngineError on a failed check."""
    findings = []
    databases = cluster.psql("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1").splitlines()
    amcheck = cluster.pg_bin / "pg_amcheck"
    if amcheck.exists():
        proc = subprocess.run(
            [
                str(amcheck),
                "-h",
                cluster.host,
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "--all",
                "--install-missing",
                "--heapallindexed",
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise EngineError(f"pg_amcheck found problems: {(proc.stdout + proc.stderr).strip()[:1500]}")
        findings.append(f"pg_amcheck clean on {len(databases)} databases")
    for db in databases:
        tables = cluster.psql(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            f"ORDER BY c.relpages DESC LIMIT {TABLES_PROBED}",
            db,
        ).splitlines()  # one quoted name a line: a name may hold spaces
        counts = [f"{t}={cluster.psql(f'SELECT count(*) FROM {t}', db).strip()}" for t in tables]
        findings.append(f"{db}: {', '.join(counts) or 'no tables'}")
    return findings
