"""Benchmark: deskvault against pgBackRest, backing up and restoring the same cluster in the same run.

Storage. Every tool stores on the same SeaweedFS (`bench/seaweed.py`: the shared one if it serves HTTPS,
else one this run starts with an HTTP and an HTTPS listener): deskvault over HTTPS, checking the
certificate (as the policy's TLS in transit deploys it), with its default settings (zstd level 3 on
every core, AES-256-GCM), and pgBackRest twice, as two configurations archiving the same source (their
archive-push commands chained in `archive_command`):
  pgbackrest_s3_async     repository on that SeaweedFS over HTTPS (repo1-storage-verify-tls=n, path-style
                          URIs, a prefix of its own in deskvault's bucket, the same credentials)
  pgbackrest_posix_async  repository in a folder on the local disk (no HTTP, no object store)
both with archive-async=y for archive-push and archive-get (spool-path), process-max = cores, zstd level
3 and AES-256-CBC (`bench/pgbackrest.py`).

Phases (strictly one after the other; before each timed one the page cache is dropped, as root, after a
sync, identically for every tool):
  backup   a full backup by each tool: deskvault through a running `deskvault worker` answering a
           published backup-due event (timed from publish to the committed manifest; the worker's
           start-up is reported apart), then pgBackRest `backup --type=full` with each configuration
  WAL      a bounded pgbench run in a database of its own, standing in for a day of WAL (its size is
           reported), ended by a marker commit and a segment switch every archive must hold
  restore  the source is stopped; each tool restores the latest point into a new folder and PostgreSQL
           replays the WAL until it is promoted: pgBackRest from S3, then from the folder
           (`restore --type=default --archive-mode=off`), then `deskvault restore --start` (CLI)
Every phase is timed by wall clock from the command's start until it ends (a restore ends when
pg_is_in_recovery() is false: the bench polls it every 0.5 s after `pgbackrest restore` and a start;
`deskvault restore --start` polls it as often and returns then, so its time includes the CLI's start-up,
reported as first_output_seconds, as pgBackRest's includes its own). Every restored cluster must hold
the marker and the source's row counts.

Figures (result JSON on stdout, progress on stderr):
  ratios.vs_<peer>.{backup,restore}_seconds   deskvault seconds / that pgBackRest's seconds (goal <= 1.0)
  backup / restore      each tool's seconds, MiB/s (backup: database size; restore: database + WAL
                        generated, the same bytes for every tool) and peak RSS (`bench/peak_rss.py`: the
                        largest process of the command's tree, and the tree's sampled sum)
  stages                what each tool's phases show: pgBackRest's backup total; restore: files laid out
                        (the restore command) vs replay (start to promotion); deskvault: the pipeline
                        seconds of the manifest, the base laid out (until its "starting PostgreSQL"
                        line) vs replay
  slowest_stage_alone   each deskvault stage run alone over the same bytes of the backup just taken, one
                        thread per core over the backup's objects (`bench/stages.py`): backup read (the
                        source's data files, from disk), compress, encrypt, upload (raw PUTs); restore
                        download (raw GETs of the backup's and its WAL's objects), decrypt, decompress,
                        write (to files, one sync), replay (PostgreSQL with every WAL file already local,
                        start to promotion). Rates are in the phase's plaintext bytes (read: the data
                        files' bytes), the same bytes the pipeline's rate uses, so they compare directly;
                        the slowest is named
  throughput_vs_slowest_stage   pipeline MiB/s / slowest stage MiB/s (goals >= 0.8 backup, >= 0.7
                        restore); the restore's pipeline is the whole `deskvault restore --start`
  throughput_vs_machine_limit   pipeline MiB/s / the fastest its stages allow on this machine
                        (`stages.machine_limit`: overlapping stages share the cores, so a pipeline takes
                        at least their machine CPU seconds over the cores; replay follows the base), and
                        the share of every core's time the machine was busy during deskvault's backup
                        and restore
  stored                bytes each tool's repository holds (backups, WAL)
The worker runs on the database host, so the target's `data_directory` is set (as a deployment beside
the database would set it; `--without-data-directory` leaves it unset); everything else is default.

Run: .venv/bin/python bench/vs_pgbackrest.py [--scale 220] [--wal-seconds 120] [--pgbench-scale 20] [--keep]
Needs RabbitMQ, PostgreSQL on 127.0.0.1:5432 (control database), the `weed` binary in the venv, and
pgBackRest (`apt-get install pgbackrest`). The defaults are the full-scale run (a ~1 GiB cluster); it
drops the page cache several times, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import stages  # noqa: E402
from bench.common import BenchServices, drop_caches, log, raw_s3  # noqa: E402
from bench.cpu import Busy  # noqa: E402
from bench.deskvault_runs import (  # noqa: E402
    BackupWorker,
    WalStream,
    archived_by_postgres,
    cli_restore,
    in_deskvault_archive,
    replay_alone,
    restore_wal_objects,
    wait,
)
from bench.pgbackrest import PgBackRest, S3Repo, start_archiving  # noqa: E402
from bench.seaweed import start as start_s3  # noqa: E402
from bench.seaweed import stored_bytes  # noqa: E402
from deskvault.local.demo_data import TABLES, helpdesk_sql  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import DEFAULT_PG_BIN, PgCluster, free_port  # noqa: E402

MIB = 2**20
TARGET = "bench"
HELPDESK_DB = "bigco"
WAL_DB = "walgen"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=220, help="helpdesk data scale (220 ~ 1.06 GiB cluster)")
    parser.add_argument(
        "--wal-seconds", type=int, default=120, help="length of the pgbench run that generates the WAL"
    )
    parser.add_argument("--pgbench-scale", type=int, default=20, help="pgbench -i -s of the WAL database")
    parser.add_argument(
        "--without-data-directory",
        action="store_true",
        help="leave targets.bench.data_directory unset, as for a worker that is not on the database host",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (clusters are stopped)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)  # a queue not declared yet is expected, not news

    scratch = Path(tempfile.mkdtemp(prefix="deskvault-vs-pgbackrest-"))
    scratch.chmod(0o755)
    services = BenchServices("vs-pgbackrest").__enter__()
    s3 = None
    source = PgCluster(scratch / "source", free_port(), tcp=True)
    restored: list[PgCluster] = []
    wal_stream = None
    settings, peers = None, []
    try:
        loads = {"start": _load()}
        s3 = start_s3(scratch)
        settings = services.settings(
            scratch,
            target=TARGET,
            conninfo=source.conninfo,
            prefix="vs-pgbackrest",
            extra=f'[wal]\nspool_dir = "{scratch / "wal-spool"}"',
            s3=s3.tls_endpoint,
            ca_bundle=s3.ca_bundle,
            target_extra="" if args.without_data_directory else f'data_directory = "{source.datadir}"',
        )
        repo = open_repository(settings)
        raw = raw_s3(settings)
        r = settings.repository
        prefix = r.prefix.rstrip("/") + "/" if r.prefix else ""
        s3_repo = S3Repo(s3.host, s3.https_port, r.bucket, r.region, r.access_key, r.secret_key, client=raw)
        peers = [
            PgBackRest(scratch / "pgbackrest-s3", source, "s3", s3=s3_repo),
            PgBackRest(scratch / "pgbackrest-posix", source, "posix"),
        ]
        for peer in peers:
            peer.configure()
        log(f"creating the source cluster with helpdesk data at scale {args.scale}")
        start_archiving(source, peers)
        source.psql(f"CREATE DATABASE {HELPDESK_DB}")
        source.psql(f"CREATE DATABASE {WAL_DB}")
        source.psql("CREATE TABLE bench_marker (note text PRIMARY KEY)")
        t = time.monotonic()
        source.psql(helpdesk_sql(HELPDESK_DB, scale=args.scale), HELPDESK_DB, timeout=3600)
        # Freshly loaded tables get vacuumed (visibility map, freezing: a full-page image per page) by
        # autovacuum minutes later; done now, it cannot land in whichever backup happens to run first.
        source.psql("VACUUM (FREEZE, ANALYZE)", HELPDESK_DB, timeout=3600)
        source.psql("CHECKPOINT")
        db_bytes = _database_bytes(source)
        log(f"source holds {db_bytes / MIB:.0f} MiB (generated in {time.monotonic() - t:.0f}s)")
        for peer in peers:
            peer.run("check")

        wal_stream = WalStream(settings, TARGET, scratch / "wal-stream.log")
        replicas = "SELECT count(*) FROM pg_stat_replication"
        wait(
            lambda: wal_stream.check_alive() or source.psql(replicas).strip() == "1",
            what="deskvault's WAL streamer to connect",
        )

        loads["backup"] = _load()
        worker = BackupWorker(settings, repo, TARGET, scratch / "worker-rss.json")
        try:
            with Busy() as busy:
                dv_backup = worker.take("full", before_publish=drop_caches)
        finally:
            peaks = worker.stop()
        dv_backup |= {
            "machine_cpu_share": busy.share,
            "peak_rss_mib": peaks["peak_rss_mib"],
            "tree_peak_rss_mib": peaks["tree_peak_rss_mib"],
            "worker_startup_seconds": peaks["startup_seconds"],
        }
        manifest = worker.last_manifest
        backup = {"deskvault": dv_backup}
        for peer in peers:
            drop_caches()
            backup[peer.name] = peer.backup("full", scratch / f"{peer.name}-backup-rss.json")

        log("stages alone: backup (read, compress, encrypt, upload) over the backup just taken")
        backup_alone, items = _backup_stages(settings, repo, raw, prefix, manifest, source, scratch)

        # Each restore replays from its own backup's checkpoint; without one after every backup, only
        # the replays of the earlier backups would pass a checkpoint record and pay for a restartpoint.
        source.psql("CHECKPOINT")
        wal = _generate_wal(source, args.wal_seconds, args.pgbench_scale)
        marker = f"marker-{uuid.uuid4().hex}"
        source.psql(f"INSERT INTO bench_marker VALUES ('{marker}')")
        expected = _fingerprint(source)
        segment = source.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()
        log(f"waiting until every archive holds segment {segment} (it holds the marker commit)")
        wait(lambda: archived_by_postgres(source, segment), timeout=300, what="pgBackRest's archives")
        wait(
            lambda: in_deskvault_archive(raw, r.bucket, prefix, TARGET, segment),
            timeout=300,
            what="deskvault's archive",
        )
        target_time = datetime.now(UTC)
        wal_stream.stop()
        wal_stream = None
        source.stop()
        stored = {"deskvault": _deskvault_stored(raw, r.bucket, prefix)}
        stored |= {peer.name: peer.stored() for peer in peers}

        loads["restore"] = _load()
        restores = {}
        for peer in peers:
            drop_caches()
            into, rss = scratch / f"restored-{peer.name}", scratch / f"{peer.name}-rss.json"
            cluster, result = peer.restore(into, rss)
            restored.append(cluster)
            restores[peer.name] = _checked(peer.name, cluster, result, expected)
        # The restored deskvault copies keep the source's archive_command: it must not write into a stanza.
        for peer in peers:
            peer.stop()
        drop_caches()
        into, rss = scratch / "restored-deskvault", scratch / "restore-rss.json"
        with Busy() as busy:
            cluster, result = cli_restore(settings, TARGET, into, rss)
        restored.append(cluster)
        restores["deskvault"] = _checked("deskvault", cluster, result, expected) | {
            "machine_cpu_share": busy.share
        }
        loads["end"] = _load()

        log("stages alone: restore (download, decrypt, decompress, write, replay)")
        restore_alone = _restore_stages(settings, repo, raw, prefix, items, scratch, expected, restored)
        _report(
            args, db_bytes, wal, backup, restores, stored, loads, target_time, peers, settings, s3,
            manifest, backup_alone, restore_alone,
        )  # fmt: skip
        return 0
    finally:
        if wal_stream is not None:
            wal_stream.stop()
        for cluster in (source, *restored):
            cluster.stop("immediate")
            if not args.keep:
                cluster.destroy()
        if s3 is not None and settings is not None and not s3.owned and not args.keep:
            _delete_prefixes(s3, settings, peers)
        if s3 is not None:
            s3.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


def _backup_stages(settings, repo, raw, prefix: str, manifest: dict, source: PgCluster, scratch: Path):
    """Each backup stage alone over the objects of `manifest`; also the items the restore stages reuse."""
    r = settings.repository
    nbytes, read_s = stages.read_files(stages.data_files(source.datadir))
    log(f"stage alone: read: {read_s:.2f}s for {nbytes / MIB:.0f} MiB of data files")
    items = stages.fetch_plaintext(repo, manifest["objects"], scratch / "stage-files", what="backup")
    plain = sum(i.plain_size for i in items)
    seconds = {
        "read": read_s,
        "compress": stages.compress(items, r.zstd_level, r.zstd_threads),
        "encrypt": stages.encrypt(items, repo.keyring),
        "upload": stages.upload(
            items, raw, r.bucket, prefix, part_size=r.part_size_mib * MIB, upload_threads=r.upload_threads
        ),
    }
    rates = stages.rates(seconds, {"read": nbytes, "compress": plain, "encrypt": plain, "upload": plain})
    return {
        "bytes": {"read": nbytes, "plaintext": plain, "sealed": sum(i.sealed.stat().st_size for i in items)},
        "objects": len(items),
        "stages": rates,
        "slowest": stages.slowest(rates),
        "machine_limit": stages.machine_limit(rates, plain),
    }, items


def _restore_stages(settings, repo, raw, prefix: str, items, scratch: Path, expected, restored) -> dict:
    """Each restore stage alone over the backup's objects and the WAL objects the restore read."""
    wal_objects = restore_wal_objects(repo, TARGET)
    wal_items = stages.fetch_plaintext(repo, wal_objects, scratch / "stage-files", what="wal")
    log(f"stages alone: preparing {len(wal_items)} WAL object(s) (compress + encrypt, untimed)")
    r = settings.repository
    stages.compress(wal_items, r.zstd_level, r.zstd_threads)
    stages.encrypt(wal_items, repo.keyring)
    every = [*items, *wal_items]
    plain = sum(i.plain_size for i in every)
    got, download_s = stages.download(raw, r.bucket, [prefix + i.key for i in every])
    seconds = {
        "download": download_s,
        "decrypt": stages.decrypt(every, repo.keyring),
        "decompress": stages.decompress(every),
        "write": stages.write(every, scratch / "stage-write"),
    }
    for item in every:
        for path in (item.plain, item.compressed, item.sealed):
            if path is not None:
                path.unlink(missing_ok=True)
    cluster, seconds["replay"] = replay_alone(repo, TARGET, scratch / "restored-replay-alone", drop_caches)
    restored.append(cluster)
    _checked("deskvault (replay alone)", cluster, {"seconds": seconds["replay"]}, expected)
    rates = stages.rates(seconds, plain)
    return {
        "bytes": {
            "plaintext": plain,
            "wal_plaintext": sum(i.plain_size for i in wal_items),
            "downloaded": got,
        },
        "objects": len(every),
        "stages": rates,
        "slowest": stages.slowest(rates),
        "machine_limit": stages.machine_limit(rates, plain, after=("replay",)),
    }


def _generate_wal(source: PgCluster, seconds: int, scale: int) -> dict[str, float]:
    """pgbench in its own database, standing in for a day of WAL: bytes written and the run's rate."""
    start = source.psql("SELECT pg_current_wal_lsn()").strip()
    pgbench = [str(DEFAULT_PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres"]
    log(f"WAL: pgbench -i -s {scale}, then pgbench -T {seconds} -c 2 -j 2")
    subprocess.run([*pgbench, "-i", "-q", "-s", str(scale), WAL_DB], check=True, capture_output=True)
    workload = [*pgbench, "-T", str(seconds), "-c", "2", "-j", "2", WAL_DB]
    run = subprocess.run(workload, check=True, capture_output=True, text=True)
    tps = re.search(r"tps = ([\d.]+)", run.stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", run.stdout)
    wal = int(float(source.psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')").strip()))
    log(f"WAL: {wal / MIB:.0f} MiB written ({tps.group(1) if tps else '?'} tps)")
    return {
        "bytes": wal,
        "pgbench_scale": scale,
        "pgbench_tps": float(tps.group(1)) if tps else 0.0,
        "pgbench_transactions": int(done.group(1)) if done else 0,
    }


def _fingerprint(cluster: PgCluster) -> dict[str, str]:
    found = {t: cluster.psql(f"SELECT count(*) FROM {t}", HELPDESK_DB).strip() for t in TABLES}
    found["pgbench_accounts"] = cluster.psql(
        "SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts", WAL_DB
    ).strip()
    found["pgbench_history"] = cluster.psql("SELECT count(*) FROM pgbench_history", WAL_DB).strip()
    found["marker"] = cluster.psql("SELECT string_agg(note, ',') FROM bench_marker").strip()
    return found


def _checked(tool: str, cluster: PgCluster, result: dict, expected: dict[str, str]) -> dict:
    found = _fingerprint(cluster)
    if found != expected:
        raise RuntimeError(f"{tool}'s restored cluster differs from the source: {found} != {expected}")
    log(f"restore: {tool} took {result['seconds']:.1f}s; marker and row counts match the source")
    size = _database_bytes(cluster)
    cluster.destroy()
    return {**result, "database_mib": size / MIB, "verified": True}


def _deskvault_stored(raw, bucket: str, prefix: str) -> dict[str, float]:
    listed = stored_bytes(raw, bucket, f"{prefix}targets/{TARGET}/")
    wal = sum(size for key, size in listed if "/wal/" in key)
    return {"backup_mib": (sum(size for _, size in listed) - wal) / MIB, "wal_mib": wal / MIB}


def _delete_prefixes(s3, settings, peers) -> None:
    """On the shared SeaweedFS: remove what this run stored (deskvault's prefix, each S3 stanza's)."""
    raw = raw_s3(settings)
    bucket = settings.repository.bucket
    prefixes = [settings.repository.prefix] + [p.repo_path.lstrip("/") + "/" for p in peers if p.s3]
    for prefix in prefixes:
        for key, _ in stored_bytes(raw, bucket, prefix):
            raw.delete_object(Bucket=bucket, Key=key)


def _report(
    args, db_bytes, wal, backup, restores, stored, loads, target_time, peers, settings, s3, manifest,
    backup_alone, restore_alone,
) -> None:  # fmt: skip
    def rounded(values):
        if isinstance(values, dict):
            return {k: rounded(v) for k, v in values.items()}
        return round(values, 2) if isinstance(values, float) else values

    wal_bytes = wal["bytes"]
    restore_bytes = db_bytes + wal_bytes
    for values in backup.values():
        values["mib_per_s"] = db_bytes / values["seconds"] / MIB
    for values in restores.values():
        values["mib_per_s"] = restore_bytes / values["seconds"] / MIB
    dv_backup, dv_restore = backup["deskvault"], restores["deskvault"]
    ratios = {
        f"vs_{peer.name}": {
            "backup_seconds": round(dv_backup["seconds"] / backup[peer.name]["seconds"], 2),
            "restore_seconds": round(dv_restore["seconds"] / restores[peer.name]["seconds"], 2),
        }
        for peer in peers
    }
    stage_view = {
        "deskvault": {
            "backup": {
                "publish_to_commit_seconds": dv_backup["seconds"],
                "pipeline_seconds": dv_backup["pipeline_seconds"],
                "worker_startup_seconds_apart": dv_backup["worker_startup_seconds"],
            },
            "restore": {
                "base_laid_out_seconds": dv_restore["files_seconds"],
                "replay_seconds": dv_restore["replay_seconds"],
                "first_output_seconds": dv_restore["first_output_seconds"],
            },
        },
        **{
            peer.name: {
                "backup": {
                    "total_seconds": backup[peer.name]["seconds"],
                    "own_timestamps_seconds": backup[peer.name]["timestamp_seconds"],
                },
                "restore": {
                    "files_laid_out_seconds": restores[peer.name]["files_seconds"],
                    "replay_seconds": restores[peer.name]["replay_seconds"],
                },
            }
            for peer in peers
        },
    }
    backup_pipe = manifest["plain_size"] / dv_backup["pipeline_seconds"] / MIB
    restore_pipe = restore_alone["bytes"]["plaintext"] / dv_restore["seconds"] / MIB
    slow_b = backup_alone["stages"][backup_alone["slowest"]]["mib_per_s"]
    slow_r = restore_alone["stages"][restore_alone["slowest"]]["mib_per_s"]
    result = {
        "database_mib": round(db_bytes / MIB),
        "wal_generated_mib": round(wal_bytes / MIB),
        "wal_stands_in_for": (
            f"a day of WAL: pgbench -i -s {wal['pgbench_scale']}, then {args.wal_seconds}s of pgbench -c 2 "
            f"-j 2 ({wal['pgbench_transactions']} transactions, {wal['pgbench_tps']:.0f} tps): "
            f"{wal_bytes / MIB:.0f} MiB of WAL"
        ),
        "ratios": ratios,
        "goal": {"backup_seconds": "<= 1.0", "restore_seconds": "<= 1.0"},
        "backup": rounded(backup),
        "restore_to": f"latest: marker committed, segment switched, archived by all at {target_time:%FT%TZ}",
        "restore": rounded(restores),
        "stages": rounded(stage_view),
        "peak_rss_mib": {
            tool: {"backup": backup[tool]["peak_rss_mib"], "restore": restores[tool]["peak_rss_mib"]}
            for tool in backup
        },
        "peak_rss": "the largest process of the command's tree (deskvault's backup: the running worker; "
        "its restore: the `deskvault restore` CLI); tree_peak_rss_mib: the sampled sum over the tree",
        "slowest_stage_alone": {
            "backup": rounded(backup_alone),
            "restore": rounded(restore_alone),
            "threads": stages.THREADS,
            "rates_in": "backup: read in data-file bytes, the rest in the backup's plaintext bytes; "
            "restore: the plaintext of the backup's objects + the WAL objects the restore reads",
        },
        "throughput_vs_slowest_stage": {
            "backup": round(backup_pipe / slow_b, 2),
            "backup_pipeline_mib_per_s": round(backup_pipe, 1),
            "restore": round(restore_pipe / slow_r, 2),
            "restore_pipeline_mib_per_s": round(restore_pipe, 1),
            "goals": {"backup": ">= 0.8", "restore": ">= 0.7"},
        },
        "throughput_vs_machine_limit": {
            "backup": round(backup_pipe / backup_alone["machine_limit"]["mib_per_s"], 2),
            "restore": round(restore_pipe / restore_alone["machine_limit"]["mib_per_s"], 2),
            "machine_cpu_share": {
                "backup": round(dv_backup["machine_cpu_share"], 2),
                "restore": round(restores["deskvault"]["machine_cpu_share"], 2),
            },
        },
        "stored": rounded(stored),
        "throughput_bytes": "backup: database size; restore: database size + WAL generated (same for all)",
        "repositories": {
            "deskvault": f"S3 over HTTPS, {s3.describe()}; zstd level {settings.repository.zstd_level}, "
            f"zstd threads {settings.repository.zstd_threads}, AES-256-GCM",
            **{
                peer.name: ("S3 over HTTPS on the same SeaweedFS" if peer.storage == "s3" else "posix folder")
                + f", archive-async=y, process-max={peer.options['process-max']}, zstd-3, AES-256-CBC"
                for peer in peers
            },
        },
        "deskvault_settings": {
            "data_directory": settings.target(TARGET).data_directory or "(unset)",
            "zstd_level": settings.repository.zstd_level,
            "zstd_threads": settings.repository.zstd_threads,
            "part_size_mib": settings.repository.part_size_mib,
            "upload_threads": settings.repository.upload_threads,
        },
        "pgbackrest_settings": {peer.name: peer.shown_settings() for peer in peers},
        "archive_command": "the pgBackRest configurations' archive-push commands chained with &&",
        "page_cache": "dropped before every timed phase" if drop_caches() else "could not be dropped",
        "load_average_1_5_15": loads,
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


def _database_bytes(cluster: PgCluster) -> int:
    return int(cluster.psql("SELECT sum(pg_database_size(datname)) FROM pg_database").strip())


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    sys.exit(main())
