"""Benchmark: one small tenant restored to a moment, against a whole-cluster restore to the same moment.

The source cluster holds `--tenants` helpdesk databases of about 17 MiB each (`--tenant-scale` 2, copies
of one populated template) and one large tenant (`--large-scale` 220: just over 1 GiB). deskvault
streams its WAL, takes a full (in parts, read from `data_directory`), then one small tenant gets
changes, the moment T is noted, and the tenant loses half its tickets after T.

Then, the page cache dropped (as root) before each:
  tenant   `deskvault tenants restore --tenant ID --at T --json`: that database alone laid out in a scratch
           server, the WAL replayed to T, the database copied into the live target beside the current one
  cluster  `deskvault restore --target T --into DIR --at T --start`: the whole cluster, recovered to T
Both are checked: the tenant's row counts and ticket checksum as of T, in the copy on the live target
and in the restored cluster; the other tenants' databases on the live target unchanged.

Both run `--rounds` times in turn (tenant, cluster, tenant, ...), so that the machine's drift moves both
of a pair alike. Result (JSON on stdout; progress on stderr): each round's seconds and ratio, and for the
round with the median ratio each one's wall seconds, phases and peak RSS, and
`ratios.tenant_over_cluster_seconds` (goal <= 0.2).

Run: .venv/bin/python bench/tenant_restore.py [--tenants 50] [--tenant-scale 2] [--large-scale 220]
     [--rounds 3] [--keep]
Needs RabbitMQ, PostgreSQL on 127.0.0.1:5432 (control database) and the `weed` binary in the venv.
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
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import BenchServices, deskvault_command, drop_caches, log, raw_s3  # noqa: E402
from bench.deskvault_runs import BackupWorker, WalStream, cli_restore, in_deskvault_archive, wait  # noqa: E402
from bench.many_tenants import LARGE, _create_tenants  # noqa: E402
from bench.peak_rss import Measured  # noqa: E402
from bench.seaweed import start as start_s3  # noqa: E402
from bench.seaweed import stored_bytes  # noqa: E402
from deskvault.local.demo_data import TABLES, table_fingerprint_sql  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import PgCluster, free_port  # noqa: E402

TARGET = "tenants"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", type=int, default=50, help="small tenant databases (default 50)")
    parser.add_argument("--tenant-scale", type=int, default=2, help="helpdesk scale of each small tenant")
    parser.add_argument("--large-scale", type=int, default=220, help="helpdesk scale of the large tenant")
    parser.add_argument("--rounds", type=int, default=3, help="restore pairs, in turn (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (clusters are stopped)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)

    scratch = Path(tempfile.mkdtemp(prefix="deskvault-tenant-restore-"))
    scratch.chmod(0o755)
    services = BenchServices("tenant-restore").__enter__()
    s3 = settings = None
    source = PgCluster(scratch / "source", free_port(), tcp=True)
    wal_stream = None
    try:
        s3 = start_s3(scratch)
        source.initdb()
        source.start()
        tenants = [f"tenant_{n:04d}" for n in range(1, args.tenants + 1)]
        chosen = tenants[len(tenants) // 2]
        entries = "".join(
            f'[tenants.{db}]\nplan = "company"\ndatabase = "{db}"\ntarget = "{TARGET}"\n'
            for db in (*tenants, LARGE)
        )
        settings = services.settings(
            scratch,
            target=TARGET,
            conninfo=source.conninfo,
            prefix="tenant-restore",
            extra=f'[wal]\nspool_dir = "{scratch / "wal-spool"}"\n{entries}',
            s3=s3.tls_endpoint,
            ca_bundle=s3.ca_bundle,
            target_extra=f'data_directory = "{source.datadir}"',
        )
        repo = open_repository(settings)
        raw = raw_s3(settings)
        r = settings.repository
        prefix = r.prefix.rstrip("/") + "/" if r.prefix else ""
        created = _create_tenants(source, tenants, args.tenant_scale, args.large_scale)

        wal_stream = WalStream(settings, TARGET, scratch / "wal-stream.log")
        replicas = "SELECT count(*) FROM pg_stat_replication"
        wait(
            lambda: wal_stream.check_alive() or source.psql(replicas).strip() == "1", what="the WAL streamer"
        )
        worker = BackupWorker(settings, repo, TARGET, scratch / "worker-full-rss.json")
        try:
            full = worker.take("full", before_publish=drop_caches)
        finally:
            worker.stop()

        log(f"history: changes to {chosen}, the moment T, then half of its tickets deleted")
        source.psql("UPDATE tickets SET status = 'solved' WHERE id % 3 = 0", chosen)
        expected = _fingerprint(source, chosen)
        time.sleep(1.1)
        moment = datetime.now(UTC)
        time.sleep(1.1)
        for table in ("replies", "attachments"):
            source.psql(f"DELETE FROM {table} WHERE ticket_id % 2 = 0", chosen)
        source.psql("DELETE FROM tickets WHERE id % 2 = 0", chosen)
        after = _fingerprint(source, chosen)
        segment = source.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()
        wait(
            lambda: in_deskvault_archive(raw, r.bucket, prefix, TARGET, segment),
            timeout=300,
            what="deskvault's archive to hold the moment",
        )
        others = {db: _fingerprint(source, db) for db in (tenants[0], tenants[-1], LARGE)}
        at = f"{moment:%Y-%m-%dT%H:%M:%S.%fZ}"

        rounds = []
        for n in range(1, args.rounds + 1):  # paired: the machine's drift moves both of a round alike
            log(f"round {n} of {args.rounds}")
            drop_caches()
            tenant = _tenant_restore(settings, chosen, at, f"{chosen}_r{n}", scratch / f"tenant-{n}-rss.json")
            copy = tenant["result"]["restored_as"]
            _check("tenant restore", _fingerprint(source, copy), expected)
            _check("the tenant's current database", _fingerprint(source, chosen), after)
            _check("the other tenants", {db: _fingerprint(source, db) for db in others}, others)
            source.psql(f'DROP DATABASE "{copy}"')

            drop_caches()
            into, rss = scratch / f"restored-cluster-{n}", scratch / f"cluster-{n}-rss.json"
            cluster, whole = cli_restore(settings, TARGET, into, rss, "--at", at)
            try:
                _check("whole-cluster restore", _fingerprint(cluster, chosen), expected)
            finally:
                cluster.stop("immediate")
                cluster.destroy()
            ratio = round(tenant["seconds"] / whole["seconds"], 3)
            log(f"round {n}: tenant {tenant['seconds']:.2f}s, cluster {whole['seconds']:.2f}s, ratio {ratio}")
            rounds.append({"tenant": tenant, "cluster": whole, "ratio": ratio})
        median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
        tenant, whole = median["tenant"], median["cluster"]

        result = {
            "cluster": created,
            "restored_tenant": chosen,
            "moment": at,
            "full": {k: full[k] for k in ("seconds", "plain_mib", "stored_mib", "objects")},
            "tenant_restore": {k: v for k, v in tenant.items() if k != "result"},  # the median round's
            "reached": {k: tenant["result"][k] for k in ("reached_at", "reached_xid", "stop", "dump_bytes")},
            "cluster_restore": whole,
            "rounds": [
                {
                    "tenant_seconds": round(r["tenant"]["seconds"], 3),
                    "cluster_seconds": round(r["cluster"]["seconds"], 3),
                    "ratio": r["ratio"],
                }
                for r in rounds
            ],
            "ratios": {  # of the round with the median ratio
                "tenant_over_cluster_seconds": median["ratio"],
                "tenant_over_cluster_peak_rss": round(tenant["peak_rss_mib"] / whole["peak_rss_mib"], 2),
            },
            "goal": {"tenant_over_cluster_seconds": "<= 0.2"},
            "verified": "the tenant's row counts and checksums as of T in both; other tenants unchanged",
            "timed": {
                "tenant_restore": "`deskvault tenants restore --tenant ID --at T --json` until it returns "
                "(the copy committed on the live target)",
                "cluster_restore": "`deskvault restore --target T --into DIR --at T --start` until it "
                "returns (recovery ended)",
            },
            "storage": f"S3 over HTTPS, {s3.describe()}",
            "page_cache": "dropped before each restore" if drop_caches() else "could not be dropped",
            "cores": os.cpu_count(),
        }
        print(json.dumps(result, indent=2, default=str))
        return 0
    finally:
        if wal_stream is not None:
            wal_stream.stop()
        source.stop("immediate")
        if not args.keep:
            source.destroy()
        if s3 is not None and settings is not None and not s3.owned and not args.keep:
            raw = raw_s3(settings)
            for key, _ in stored_bytes(raw, settings.repository.bucket, settings.repository.prefix):
                raw.delete_object(Bucket=settings.repository.bucket, Key=key)
        if s3 is not None:
            s3.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


def _tenant_restore(settings, tenant: str, at: str, as_name: str, rss_file: Path) -> dict:
    command = deskvault_command(
        settings, "tenants", "restore", "--tenant", tenant, "--at", at, "--as", as_name, "--json"
    )
    log(f"tenant: deskvault tenants restore --tenant {tenant} --at {at}")
    t = time.monotonic()
    run = Measured(command, rss_file, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []

    def read() -> None:  # progress, each line stamped with the seconds since the command started
        for raw in run.proc.stderr:
            lines.append((time.monotonic() - t, line := raw.decode(errors="replace").strip()))
            log(f"tenant: deskvault ({lines[-1][0]:.2f}s): {line}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    output = run.proc.stdout.read()
    code = run.wait(timeout=6 * 3600)
    seconds = time.monotonic() - t
    reader.join(timeout=10)
    if code != 0:
        raise RuntimeError(f"deskvault tenants restore failed (exit {code})")
    result = json.loads(output)
    log(f"tenant: restored as {result['restored_as']} in {seconds:.1f}s")

    def at(start: str) -> float | None:
        return next((when for when, line in lines if line.startswith(start)), None)

    phases = {  # when each phase began, in seconds since the command started
        "first_output": lines[0][0] if lines else None,
        "base": at("restoring base backup"),
        "postgresql_start": at("starting PostgreSQL"),
        "recovered": at("replay passed over"),
        "copy": at("copying "),
        "copied": at("copied: "),
    }
    return {"seconds": seconds, **run.peaks_mib(), "phases_began_at": phases, "result": result}


def _fingerprint(cluster: PgCluster, database: str) -> dict[str, str]:
    return {t: cluster.psql(table_fingerprint_sql(t), database).strip() for t in TABLES}


def _check(what: str, found: dict, expected: dict) -> None:
    if found != expected:
        raise RuntimeError(f"{what}: the data differs from what it should be: {found} != {expected}")
    log(f"check: {what}: as expected")


if __name__ == "__main__":
    sys.exit(main())
