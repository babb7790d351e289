"""Benchmark: one cluster of many small tenant databases and one large one, deskvault beside pgBackRest.

The source cluster holds `--tenants` helpdesk databases (`deskvault.local.demo_data`, `--tenant-scale`;
scale 1 is about 6 MiB of tables beside PostgreSQL's 7.5 MiB of catalogs per database), each created
from one populated template (CREATE DATABASE ... TEMPLATE, STRATEGY FILE_COPY, so the copies cost no WAL),
plus one large tenant (`--large-scale`; 200 is about 1 GiB). Both tools archive its WAL all along:
deskvault streams it (`deskvault wal-stream`), pgBackRest receives every segment from archive_command.

Then, each tool one after the other in the same run, the page cache dropped (as root) before each timed
step:
  full      deskvault: a running `deskvault worker` answering a published backup-due(kind=full), timed
            from publish to the committed manifest; pgBackRest: `backup --type=full`
  change    `--changed` tenants get updates and inserts, then a CHECKPOINT
  diff      deskvault: backup-due(kind=diff) to a fresh worker (a differential copies the files changed
            since the full from `data_directory`: the worker runs on the database host); pgBackRest:
            `backup --type=diff`
  list      `deskvault backups list --json` against `pgbackrest info --output=json`
  restore   the source is stopped after a marker commit every archive holds; `deskvault restore
            --start` (CLI) and `pgbackrest restore` + PostgreSQL's recovery, each timed until
            pg_is_in_recovery() is false, and checked: row counts of several tenants (the changed ones
            among them) and of the large one, the marker, and the number of tenant databases
Every command runs under `bench/peak_rss.py`: wall time and peak RSS (the largest process of its tree,
and the tree's sampled sum) for each tool alike.

pgBackRest is configured as in bench/vs_pgbackrest.py (`bench/pgbackrest.py`): repository on the same
SeaweedFS over HTTPS, archive-async=y for push and get, process-max = cores, zstd level 3, AES-256-CBC.
deskvault uses its defaults, on the same SeaweedFS over HTTPS (checking the certificate).

Result (JSON on stdout; progress on stderr): per step each tool's seconds and peak RSS, the ratios
deskvault / pgBackRest (goal <= 1.0), and stored bytes: each full and differential, the differential
against its full, and the WAL archive.

Run: .venv/bin/python bench/many_tenants.py [--tenants 1000] [--tenant-scale 1] [--large-scale 200]
     [--changed 10] [--keep]
Needs RabbitMQ, PostgreSQL on 127.0.0.1:5432 (control database), the `weed` binary in the venv, and
pgBackRest (`apt-get install pgbackrest`). At the defaults the cluster is about 14 GiB.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import BenchServices, deskvault_command, drop_caches, log, raw_s3  # noqa: E402
from bench.deskvault_runs import (  # noqa: E402
    BackupWorker,
    WalStream,
    archived_by_postgres,
    cli_restore,
    in_deskvault_archive,
    wait,
)
from bench.peak_rss import Measured  # noqa: E402
from bench.pgbackrest import PgBackRest, S3Repo, start_archiving  # noqa: E402
from bench.seaweed import start as start_s3  # noqa: E402
from bench.seaweed import stored_bytes  # noqa: E402
from deskvault.local.demo_data import TABLES, helpdesk_sql  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import DEFAULT_PG_BIN, PgCluster, free_port  # noqa: E402

MIB = 2**20
TARGET = "tenants"
TEMPLATE = "tenant_template"
LARGE = "tenant_large"
CHANGE_SQL = """
UPDATE tickets SET status = 'solved', priority = priority + 1 WHERE id % 5 = 0;
INSERT INTO replies
  SELECT m.top + g, 1 + g % 100, 1, md5(g::text || 'changed'), now()
  FROM generate_series(1, 500) g, (SELECT max(id) AS top FROM replies) m;
INSERT INTO kb_articles
  SELECT m.top + g, 'Changed ' || g, md5(g::text), true, now()
  FROM generate_series(1, 20) g, (SELECT max(id) AS top FROM kb_articles) m;
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", type=int, default=1000, help="small tenant databases (default 1000)")
    parser.add_argument("--tenant-scale", type=int, default=1, help="helpdesk scale of each small tenant")
    parser.add_argument("--large-scale", type=int, default=200, help="helpdesk scale of the large tenant")
    parser.add_argument("--changed", type=int, default=10, help="tenants changed before the differential")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (clusters are stopped)")
    args = parser.parse_args()
    if not 0 < args.changed <= args.tenants:
        parser.error("--changed must be between 1 and --tenants")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)

    scratch = Path(tempfile.mkdtemp(prefix="deskvault-many-tenants-"))
    scratch.chmod(0o755)
    services = BenchServices("many-tenants").__enter__()
    s3 = settings = None
    source = PgCluster(scratch / "source", free_port(), tcp=True)
    restored: list[PgCluster] = []
    wal_stream = None
    peer = None
    try:
        s3 = start_s3(scratch)
        settings = services.settings(
            scratch,
            target=TARGET,
            conninfo=source.conninfo,
            prefix="many-tenants",
            extra=f'[wal]\nspool_dir = "{scratch / "wal-spool"}"',
            s3=s3.tls_endpoint,
            ca_bundle=s3.ca_bundle,
            target_extra=f'data_directory = "{source.datadir}"',
        )
        repo = open_repository(settings)
        raw = raw_s3(settings)
        r = settings.repository
        prefix = r.prefix.rstrip("/") + "/" if r.prefix else ""
        peer = PgBackRest(
            scratch / "pgbackrest-s3",
            source,
            "s3",
            s3=S3Repo(s3.host, s3.https_port, r.bucket, r.region, r.access_key, r.secret_key, client=raw),
        )
        peer.configure()
        start_archiving(source, [peer])
        tenants = [f"tenant_{n:04d}" for n in range(1, args.tenants + 1)]
        created = _create_tenants(source, tenants, args.tenant_scale, args.large_scale)
        peer.run("check")
        # Spread over the tenants, so the changed files are not neighbours on disk.
        step = max(1, len(tenants) // args.changed)
        changed = tenants[::step][: args.changed]
        checked = sorted({*changed[:3], tenants[-1], tenants[len(tenants) // 2], LARGE})

        wal_stream = WalStream(settings, TARGET, scratch / "wal-stream.log")
        replicas = "SELECT count(*) FROM pg_stat_replication"
        wait(
            lambda: wal_stream.check_alive() or source.psql(replicas).strip() == "1",
            what="deskvault's WAL streamer to connect",
        )

        steps: dict[str, dict] = {"deskvault": {}, peer.name: {}}
        steps["deskvault"]["full"] = _deskvault_backup(settings, repo, "full", scratch)
        drop_caches()
        steps[peer.name]["full"] = peer.backup("full", scratch / "pgbackrest-full-rss.json")

        log(f"change: updates and inserts in {len(changed)} tenants, then CHECKPOINT")
        for db in changed:
            source.psql(CHANGE_SQL, db)
        source.psql("CHECKPOINT")
        steps["deskvault"]["diff"] = _deskvault_backup(settings, repo, "diff", scratch)
        drop_caches()
        steps[peer.name]["diff"] = peer.backup("diff", scratch / "pgbackrest-diff-rss.json")

        steps["deskvault"]["list"] = _deskvault_list(settings, scratch)
        steps[peer.name]["list"] = _pgbackrest_info(peer, scratch)

        marker = f"marker-{uuid.uuid4().hex}"
        source.psql("CREATE TABLE bench_marker (note text PRIMARY KEY)")
        source.psql(f"INSERT INTO bench_marker VALUES ('{marker}')")
        expected = _fingerprint(source, checked)
        segment = source.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()
        log(f"waiting until both archives hold segment {segment} (it holds the marker commit)")
        wait(lambda: archived_by_postgres(source, segment), timeout=300, what="pgBackRest's archive")
        wait(
            lambda: in_deskvault_archive(raw, r.bucket, prefix, TARGET, segment),
            timeout=300,
            what="deskvault's archive",
        )
        wal_stream.stop()
        wal_stream = None
        source.stop()

        drop_caches()
        cluster, result = peer.restore(
            scratch / "restored-pgbackrest", scratch / "pgbackrest-restore-rss.json"
        )
        restored.append(cluster)
        steps[peer.name]["restore"] = _checked(peer.name, cluster, result, expected, checked)
        peer.stop()  # the restored deskvault copy keeps the source's archive_command
        drop_caches()
        into, rss = scratch / "restored-deskvault", scratch / "restore-rss.json"
        cluster, result = cli_restore(settings, TARGET, into, rss)
        restored.append(cluster)
        steps["deskvault"]["restore"] = _checked("deskvault", cluster, result, expected, checked)

        stored = {
            "deskvault": _deskvault_stored(steps["deskvault"], raw, r.bucket, prefix),
            peer.name: _pgbackrest_stored(steps[peer.name], peer),
        }
        _report(args, created, changed, checked, steps, stored, peer, settings, s3)
        return 0
    finally:
        if wal_stream is not None:
            wal_stream.stop()
        for cluster in (source, *restored):
            cluster.stop("immediate")
            if not args.keep:
                cluster.destroy()
        if s3 is not None and settings is not None and not s3.owned and not args.keep:
            raw = raw_s3(settings)
            for where in [settings.repository.prefix] + ([peer.repo_path.lstrip("/") + "/"] if peer else []):
                for key, _ in stored_bytes(raw, settings.repository.bucket, where):
                    raw.delete_object(Bucket=settings.repository.bucket, Key=key)
        if s3 is not None:
            s3.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


def _create_tenants(source: PgCluster, tenants: list[str], scale: int, large_scale: int) -> dict:
    """The template, its copies, and the large tenant; sizes and how long each part took."""
    t = time.monotonic()
    source.psql(f"CREATE DATABASE {TEMPLATE}")
    source.psql(helpdesk_sql(TEMPLATE, scale=scale), TEMPLATE, timeout=3600)
    # Vacuumed now (every copy inherits it), not by autovacuum during whichever backup runs first.
    source.psql("VACUUM (FREEZE, ANALYZE)", TEMPLATE, timeout=3600)
    source.psql("CHECKPOINT")
    template_bytes = int(source.psql(f"SELECT pg_database_size('{TEMPLATE}')").strip())
    log(f"tenants: template of {template_bytes / MIB:.1f} MiB; copying it {len(tenants)} times")
    # One session, a statement at a time (CREATE DATABASE refuses a transaction block); FILE_COPY
    # copies the files after a checkpoint instead of writing the whole template into the WAL.
    script = "".join(f"CREATE DATABASE {db} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY;\n" for db in tenants)
    _psql_script(source, script)
    copies_s = time.monotonic() - t
    log(f"tenants: {len(tenants)} databases in {copies_s:.0f}s; now the large tenant at scale {large_scale}")
    t = time.monotonic()
    source.psql(f"CREATE DATABASE {LARGE}")
    source.psql(helpdesk_sql(LARGE, scale=large_scale), LARGE, timeout=3 * 3600)
    source.psql("VACUUM (FREEZE, ANALYZE)", LARGE, timeout=3 * 3600)
    source.psql("CHECKPOINT")
    large_bytes = int(source.psql(f"SELECT pg_database_size('{LARGE}')").strip())
    total = int(source.psql("SELECT sum(pg_database_size(datname)) FROM pg_database").strip())
    large_s = time.monotonic() - t
    log(f"tenants: large tenant {large_bytes / MIB:.0f} MiB in {large_s:.0f}s; cluster {total / MIB:.0f} MiB")
    return {
        "tenant_databases": len(tenants),
        "tenant_mib_each": round(template_bytes / MIB, 1),
        "large_tenant_mib": round(large_bytes / MIB),
        "cluster_mib": round(total / MIB),
        "creating_tenants_seconds": round(copies_s, 1),
        "creating_large_tenant_seconds": round(large_s, 1),
    }


def _psql_script(cluster: PgCluster, script: str, dbname: str = "postgres") -> None:
    command = [
        str(DEFAULT_PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.host,
        "-p", str(cluster.port), "-U", "postgres", "-d", dbname, "-f", "-",
    ]  # fmt: skip
    done = subprocess.run(command, input=script, capture_output=True, text=True, timeout=6 * 3600)
    if done.returncode != 0:
        raise RuntimeError(f"psql script failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")


def _deskvault_backup(settings, repo, kind: str, scratch: Path) -> dict:
    """A fresh worker per backup, so each backup's peak RSS is its own; its start-up is not timed."""
    worker = BackupWorker(settings, repo, TARGET, scratch / f"worker-{kind}-rss.json")
    try:
        result = worker.take(kind, before_publish=drop_caches)
    finally:
        peaks = worker.stop()
    return {**result, **peaks}


def _deskvault_list(settings, scratch: Path) -> dict:
    log("list: deskvault backups list --json (CLI)")
    command = deskvault_command(settings, "backups", "list", "--target", TARGET, "--json")
    t = time.monotonic()
    run = Measured(command, scratch / "list-rss.json", cwd=ROOT, stdout=subprocess.PIPE)
    output, _ = run.proc.communicate(timeout=600)
    code = run.wait()
    seconds = time.monotonic() - t
    if code != 0:
        raise RuntimeError(f"deskvault backups list failed (exit {code})")
    kinds = [b["kind"] for b in json.loads(output)["backups"]]
    if sorted(kinds) != ["diff", "full"]:
        raise RuntimeError(f"deskvault backups list shows {kinds}, not one full and one diff")
    return {"seconds": seconds, **run.peaks_mib(), "backups": kinds}


def _pgbackrest_info(peer: PgBackRest, scratch: Path) -> dict:
    log("list: pgbackrest info --output=json")
    result = peer.measured("--output=json", "info", out=scratch / "pgbackrest-info-rss.json")
    kinds = [b["type"] for b in peer.info()[0]["backup"]]
    if kinds != ["full", "diff"]:
        raise RuntimeError(f"pgbackrest info shows {kinds}, not one full and one diff")
    return {**result, "backups": kinds}


def _fingerprint(cluster: PgCluster, databases: list[str]) -> dict[str, str]:
    counts = ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
    found = {
        db: cluster.psql(f"SELECT concat_ws(',', {counts}, (SELECT sum(priority) FROM tickets))", db).strip()
        for db in databases
    }
    found["tenant_databases"] = cluster.psql(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'tenant\\_%'"
    ).strip()
    found["marker"] = cluster.psql("SELECT string_agg(note, ',') FROM bench_marker").strip()
    return found


def _checked(tool: str, cluster: PgCluster, result: dict, expected: dict, databases: list[str]) -> dict:
    found = _fingerprint(cluster, databases)
    if found != expected:
        raise RuntimeError(f"{tool}'s restored cluster differs from the source: {found} != {expected}")
    log(f"restore: {tool} took {result['seconds']:.1f}s; row counts of {len(databases)} tenants match")
    cluster.destroy()
    return {**result, "verified": True, "checked_databases": databases}


def _deskvault_stored(steps: dict, raw, bucket: str, prefix: str) -> dict:
    listed = stored_bytes(raw, bucket, f"{prefix}targets/{TARGET}/")
    wal = sum(size for key, size in listed if "/wal/" in key)
    full, diff = steps["full"]["stored_mib"], steps["diff"]["stored_mib"]
    return {
        "full_mib": full,
        "diff_mib": diff,
        "diff_over_full": round(diff / full, 4) if full else None,
        "wal_mib": wal / MIB,
        "repository_mib": sum(size for _, size in listed) / MIB,
    }


def _pgbackrest_stored(steps: dict, peer: PgBackRest) -> dict:
    repo = peer.stored()
    full, diff = steps["full"]["stored_mib"], steps["diff"]["stored_mib"]
    return {
        "full_mib": full,
        "diff_mib": diff,
        "diff_over_full": round(diff / full, 4) if full else None,
        "wal_mib": repo["wal_mib"],
        "repository_mib": repo["backup_mib"] + repo["wal_mib"],
    }


def _report(args, created, changed, checked, steps, stored, peer, settings, s3) -> None:
    def rounded(values):
        if isinstance(values, dict):
            return {k: rounded(v) for k, v in values.items()}
        return round(values, 2) if isinstance(values, float) else values

    dv, pg = steps["deskvault"], steps[peer.name]
    ratios = {
        f"{step}_seconds": round(dv[step]["seconds"] / pg[step]["seconds"], 2)
        for step in ("full", "diff", "list", "restore")
    }
    ratios |= {
        "full_peak_rss": round(dv["full"]["peak_rss_mib"] / pg["full"]["peak_rss_mib"], 2),
        "diff_peak_rss": round(dv["diff"]["peak_rss_mib"] / pg["diff"]["peak_rss_mib"], 2),
        "restore_peak_rss": round(dv["restore"]["peak_rss_mib"] / pg["restore"]["peak_rss_mib"], 2),
        "full_stored": round(stored["deskvault"]["full_mib"] / stored[peer.name]["full_mib"], 2),
        "diff_stored": round(stored["deskvault"]["diff_mib"] / stored[peer.name]["diff_mib"], 2),
    }
    result = {
        "cluster": created,
        "changed_tenants": changed,
        "ratios_deskvault_over_pgbackrest": {"vs": f"{peer.name}", **ratios},
        "goal": {"seconds": "<= 1.0"},
        "wall_seconds": {
            tool: {step: round(values["seconds"], 2) for step, values in by_step.items()}
            for tool, by_step in steps.items()
        },
        "peak_rss_mib": {
            tool: {step: values.get("peak_rss_mib") for step, values in by_step.items()}
            for tool, by_step in steps.items()
        },
        "stored": rounded(stored),
        "steps": rounded(steps),
        "timed": {
            "deskvault": "full/diff: publish backup-due to the committed manifest, the worker already "
            "running (its start-up apart); list: `deskvault backups list --json`; restore: "
            "`deskvault restore --start` until it returns (recovery ended)",
            peer.name: "full/diff: `pgbackrest backup --type=...`; list: `pgbackrest info --output=json`; "
            "restore: `pgbackrest restore` + start until pg_is_in_recovery() is false",
        },
        "peak_rss": "the largest process of the command's tree (getrusage RUSAGE_CHILDREN of a wrapper); "
        "tree_peak_rss_mib in steps: the sampled sum over the tree",
        "repositories": {
            "deskvault": f"S3 over HTTPS, {s3.describe()}; defaults: zstd level "
            f"{settings.repository.zstd_level}, zstd threads {settings.repository.zstd_threads}, "
            "AES-256-GCM; data_directory set",
            peer.name: "S3 over HTTPS on the same SeaweedFS, archive-async=y, "
            f"process-max={peer.options['process-max']}, zstd-3, AES-256-CBC",
        },
        "pgbackrest_settings": peer.shown_settings(),
        "page_cache": "dropped before every timed step" if drop_caches() else "could not be dropped",
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
