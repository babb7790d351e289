"""Benchmark: deskvault against pgBackRest, backing up and restoring the same cluster in the same run.

One scratch PostgreSQL cluster (>= 1 GiB of helpdesk data) is archived by both tools at once: deskvault
streams its WAL (`WalStreamer`, a replication slot) into SeaweedFS, pgBackRest receives every segment
from `archive_command`. Then:
  backup   a full backup by each tool, one after the other: deskvault through a real, already running
           `deskvault worker` answering a published backup-due event (timed from publish to the
           committed manifest; the worker's start-up is reported apart), pgBackRest with
           `pgbackrest backup --type=full`
  WAL      a bounded pgbench run in a separate database, standing in for a day of WAL (its size is
           reported), ended by a marker commit and a segment switch both archives must hold
  restore  the source is stopped; each tool restores the latest point into a new folder and PostgreSQL
           replays the WAL until it is promoted (pgBackRest first, then deskvault, never in parallel)
Every phase is timed by wall clock from the command's start to its end (a restore ends when
`pg_is_in_recovery()` is false). Both restored clusters must hold the marker and the source's row counts.
Ratios are deskvault seconds / pgBackRest seconds (goal <= 1.0). Throughput uses the same bytes for
both tools: the database size for a backup, the database size plus the WAL generated for a restore.

pgBackRest's repository is a local folder while deskvault's is S3 (SeaweedFS on the same machine): the
comparison favours pgBackRest, which pays no HTTP and no object store.

Run: .venv/bin/python bench/vs_pgbackrest.py [--scale 220] [--wal-seconds 120] [--keep]
Needs RabbitMQ, PostgreSQL on 127.0.0.1:5432 (control database), SeaweedFS via .deskvault, and
pgBackRest (`apt-get install pgbackrest`). Progress goes to stderr, the result (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BenchServices,
    backup_worker_command,
    log,
    publish_full_backup,
    queue_consumers,
)
from deskvault.local.demo_data import TABLES, helpdesk_sql  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import DEFAULT_PG_BIN, PgCluster, free_port, hand_over, server_user  # noqa: E402
from workers.engines.postgresql.restore import plan_restore, restore  # noqa: E402
from workers.engines.postgresql.walarchive import list_wal  # noqa: E402
from workers.engines.postgresql.walstream import WalStreamer  # noqa: E402
from workers.repository import catalog  # noqa: E402

MIB = 2**20
TARGET = "bench"
STANZA = "bench"
HELPDESK_DB = "bigco"
WAL_DB = "walgen"
PGBENCH_SCALE = 20
# Both tools pay for zstd level 3 and encryption; pgBackRest may use both cores, as deskvault's restore
# and WAL uploads do.
PGBACKREST_OPTIONS = {
    "repo1-type": "posix",
    "repo1-cipher-type": "aes-256-cbc",
    "compress-type": "zst",
    "compress-level": "3",
    "process-max": "2",
    "start-fast": "y",
    "repo1-retention-full": "2",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=220, help="helpdesk data scale (220 ~ 1.06 GiB cluster)")
    parser.add_argument(
        "--wal-seconds", type=int, default=120, help="length of the pgbench run that generates the WAL"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (clusters are stopped)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)  # a queue not declared yet is expected, not news

    scratch = Path(tempfile.mkdtemp(prefix="deskvault-vs-pgbackrest-"))
    scratch.chmod(0o755)
    services = BenchServices("vs-pgbackrest").__enter__()
    source = PgCluster(scratch / "source", free_port(), tcp=True)
    pgbackrest = PgBackRest(scratch / "pgbackrest", source)
    stop_streaming = threading.Event()
    streamer: threading.Thread | None = None
    repo = None
    try:
        loads = {"start": _load()}
        pgbackrest.configure()
        log(f"creating the source cluster with helpdesk data at scale {args.scale} (takes a few minutes)")
        source.initdb(extra_conf=f"archive_mode = on\narchive_command = '{pgbackrest.archive_command()}'\n")
        source.start()
        source.psql(f"CREATE DATABASE {HELPDESK_DB}")
        source.psql(f"CREATE DATABASE {WAL_DB}")
        source.psql("CREATE TABLE bench_marker (note text PRIMARY KEY)")
        t = time.monotonic()
        source.psql(helpdesk_sql(HELPDESK_DB, scale=args.scale), HELPDESK_DB, timeout=3600)
        source.psql("CHECKPOINT")
        db_bytes = _database_bytes(source)
        log(f"source holds {db_bytes / MIB:.0f} MiB (generated in {time.monotonic() - t:.0f}s)")
        pgbackrest.run("stanza-create")
        pgbackrest.run("check")

        settings = services.settings(
            scratch,
            target=TARGET,
            conninfo=source.conninfo,
            prefix="vs-pgbackrest",
            extra=f'[wal]\nspool_dir = "{scratch / "wal-spool"}"',
        )
        repo = open_repository(settings)
        streamer = _start_streaming(settings, repo, scratch, stop_streaming)
        _wait(
            lambda: source.psql("SELECT count(*) FROM pg_stat_replication").strip() == "1",
            what="deskvault's WAL streamer to connect",
        )

        loads["backup"] = _load()
        backup = {
            "deskvault": _deskvault_backup(settings, source),
            "pgbackrest": _pgbackrest_backup(pgbackrest, source),
        }

        # Each restore replays from its own backup's checkpoint, and pgBackRest's came second: without a
        # checkpoint after both, only deskvault's replay would pass one and pay for a restartpoint.
        source.psql("CHECKPOINT")
        wal = _generate_wal(source, args.wal_seconds)
        marker = f"marker-{uuid.uuid4().hex}"
        source.psql(f"INSERT INTO bench_marker VALUES ('{marker}')")
        expected = _fingerprint(source)
        segment = source.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()
        log(f"waiting until both archives hold segment {segment} (it holds the marker commit)")
        _wait(lambda: _archived_by_postgres(source, segment), timeout=300, what="pgBackRest's archive")
        _wait(lambda: _in_deskvault_archive(repo, segment), timeout=300, what="deskvault's archive")
        target_time = datetime.now(UTC)
        stop_streaming.set()
        streamer.join(timeout=60)
        streamer = None
        source.stop()
        stored = {"deskvault": _deskvault_stored(repo), "pgbackrest": pgbackrest.stored()}

        loads["restore"] = _load()
        restores = {
            "pgbackrest": _pgbackrest_restore(pgbackrest, scratch, expected),
            "pgbackrest_archive_async": _pgbackrest_restore(
                pgbackrest, scratch, expected, archive_async=True
            ),
            # The copied archive_command of the restored deskvault copy must not write into the stanza.
            "deskvault": _deskvault_restore(repo, scratch, expected, before=pgbackrest.stop),
        }
        loads["end"] = _load()
        _report(db_bytes, wal, args, backup, restores, stored, loads, target_time, pgbackrest, settings)
        return 0
    finally:
        stop_streaming.set()
        if streamer is not None:
            streamer.join(timeout=60)
        for cluster in (source, *_RESTORED):
            cluster.stop("immediate")
            if not args.keep:
                cluster.destroy()
        if repo is not None and not args.keep:
            for key in list(repo.store.list_keys()):
                repo.store.delete(key)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        services.__exit__(None, None, None)


_RESTORED: list[PgCluster] = []


@dataclass
class PgBackRest:
    """A pgBackRest stanza for the source cluster, its repository a local folder owned by postgres."""

    home: Path
    source: PgCluster

    def __post_init__(self) -> None:
        self.config = self.home / "pgbackrest.conf"
        self.repo_path = self.home / "repo"
        self.spool_path = self.home / "spool"
        self.options = {
            **PGBACKREST_OPTIONS,
            "repo1-path": str(self.repo_path),
            "repo1-cipher-pass": secrets.token_urlsafe(32),
            "log-path": str(self.home / "log"),
            "lock-path": str(self.home / "lock"),
        }

    def configure(self) -> None:
        for folder in (self.repo_path, self.spool_path, self.home / "log", self.home / "lock"):
            folder.mkdir(parents=True)
        lines = ["[global]", *(f"{k}={v}" for k, v in self.options.items()), "", f"[{STANZA}]"]
        lines += [f"pg1-path={self.source.datadir}", f"pg1-port={self.source.port}", ""]
        self.config.write_text("\n".join(lines))
        self.config.chmod(0o600)
        hand_over(self.home)

    def archive_command(self) -> str:
        return f"pgbackrest --config={self.config} --stanza={STANZA} archive-push %p"

    def run(self, *args: str, timeout: float = 3600) -> str:
        """A pgbackrest command as the server's user; output at info level, returned."""
        user = server_user()
        # The scratch clusters listen on TCP only and pg1-socket-path takes a directory, so the host is
        # left to libpq, which reads PGHOST.
        cmd = [
            *(["runuser", "-u", user, "--"] if user else []),
            "env",
            "PGHOST=127.0.0.1",
            "pgbackrest",
            f"--config={self.config}",
            f"--stanza={STANZA}",
            "--log-level-console=info",
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pgbackrest {' '.join(args)} failed (exit {proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
            )
        return proc.stdout

    def enable_async_archive_get(self) -> None:
        """From now on archive-get (the restored copy's restore_command) prefetches WAL with process-max."""
        with self.config.open("a") as f:
            f.write(f"[{STANZA}:archive-get]\narchive-async=y\nspool-path={self.spool_path}\n")

    def stop(self) -> None:
        """Refuse further commands on the stanza (a restored copy's archive-push fails instead)."""
        self.run("stop")

    def stored(self) -> dict[str, float]:
        return {
            "backup_mib": _du(self.repo_path / "backup") / MIB,
            "wal_mib": _du(self.repo_path / "archive") / MIB,
        }

    def shown_settings(self) -> dict[str, str]:
        shown = {k: v for k, v in self.options.items() if k != "repo1-cipher-pass"}
        shown["repo1-cipher-pass"] = "<random, 32 bytes>"
        shown["archive_command"] = self.archive_command()
        shown["archive-async"] = (
            f"n (default); for restore 'pgbackrest_archive_async' the config gains [{STANZA}:archive-get] "
            "archive-async=y, spool-path=<scratch>"
        )
        shown["restore"] = "--type=default --archive-mode=off --pg1-path=<new folder>"
        return shown


def _start_streaming(settings, repo, scratch: Path, stop: threading.Event) -> threading.Thread:
    spool = Path(settings.wal.spool_dir) / TARGET
    streamer = WalStreamer(settings.target(TARGET), repo, spool, settings.wal.upload_interval_seconds)
    thread = threading.Thread(target=streamer.run, args=(stop,), name="wal-bench", daemon=True)
    thread.start()
    return thread


def _deskvault_backup(settings, source: PgCluster) -> dict[str, float]:
    """A running worker takes a full backup from a published event, timed from publish to commit.

    Workers are long-running services, so their start-up is not part of a backup; it is reported apart.
    """
    repo = open_repository(settings)
    t = time.monotonic()
    worker = subprocess.Popen(backup_worker_command(settings, burst=False), cwd=ROOT)
    try:
        _wait(lambda: queue_consumers(settings, "backup") > 0, timeout=60, what="the backup worker")
        startup = time.monotonic() - t
        _settle(source)
        log("backup: deskvault, from publishing backup-due(kind=full) to the committed manifest")
        t = time.monotonic()
        publish_full_backup(settings, TARGET)
        _wait(lambda: _has_full(repo), timeout=3600, what="the backup", poll=0.1)
        seconds = time.monotonic() - t
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    manifest = catalog.newest_full(repo, TARGET)
    inner = datetime.fromisoformat(manifest["finished_at"]) - datetime.fromisoformat(manifest["started_at"])
    log(f"backup: deskvault took {seconds:.1f}s (worker start-up {startup:.1f}s before it)")
    return {
        "seconds": seconds,
        "pipeline_seconds": inner.total_seconds(),
        "worker_startup_seconds": startup,
        "plain_mib": manifest["plain_size"] / MIB,
        "stored_mib": manifest["stored_size"] / MIB,
    }


def _has_full(repo) -> bool:
    manifests, _ = catalog.scan_manifests(repo, TARGET)
    return any(m["kind"] == "full" for m in manifests)


def _pgbackrest_backup(pgbackrest: PgBackRest, source: PgCluster) -> dict[str, float]:
    _settle(source)
    log("backup: pgbackrest --type=full backup")
    t = time.monotonic()
    pgbackrest.run("--type=full", "backup")
    seconds = time.monotonic() - t
    info = json.loads(pgbackrest.run("--output=json", "info"))
    last = info[0]["backup"][-1]
    log(f"backup: pgBackRest took {seconds:.1f}s")
    return {
        "seconds": seconds,
        "plain_mib": last["info"]["size"] / MIB,
        "stored_mib": last["info"]["repository"]["delta"] / MIB,
    }


def _settle(source: PgCluster) -> None:
    """Before a timed phase: nothing dirty left to write back, and the source's files in the page cache."""
    subprocess.run(["sync"], check=True)
    for root, _, files in os.walk(source.datadir):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    while f.read(4 * MIB):
                        pass
            except OSError:  # a file PostgreSQL removed meanwhile
                pass


def _generate_wal(source: PgCluster, seconds: int) -> dict[str, float]:
    """pgbench in its own database, standing in for a day of WAL: bytes written and the run's rate."""
    start = source.psql("SELECT pg_current_wal_lsn()").strip()
    pgbench = [str(DEFAULT_PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres"]
    log(f"WAL: pgbench -i -s {PGBENCH_SCALE}, then pgbench -T {seconds} -c 2 -j 2")
    subprocess.run([*pgbench, "-i", "-q", "-s", str(PGBENCH_SCALE), WAL_DB], check=True, capture_output=True)
    workload = [*pgbench, "-T", str(seconds), "-c", "2", "-j", "2", WAL_DB]
    run = subprocess.run(workload, check=True, capture_output=True, text=True)
    tps = re.search(r"tps = ([\d.]+)", run.stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", run.stdout)
    wal = int(float(source.psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')").strip()))
    log(f"WAL: {wal / MIB:.0f} MiB written ({tps.group(1) if tps else '?'} tps)")
    return {
        "bytes": wal,
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


def _archived_by_postgres(source: PgCluster, segment: str) -> bool:
    last = source.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").strip()
    return len(last) == len(segment) and last >= segment


def _in_deskvault_archive(repo, segment: str) -> bool:
    return any(e.filename == segment for e in list_wal(repo, TARGET))


def _pgbackrest_restore(
    pgbackrest: PgBackRest, scratch: Path, expected: dict[str, str], *, archive_async: bool = False
) -> dict[str, float]:
    name = "pgbackrest-async" if archive_async else "pgbackrest"
    into = scratch / f"restored-{name}"
    into.mkdir(mode=0o700)
    hand_over(into)
    cluster = PgCluster(into, free_port())
    _RESTORED.append(cluster)
    # --archive-mode=off: the restored copy must not push its new timeline into the stanza.
    options = [f"--pg1-path={into}", "--type=default", "--archive-mode=off"]
    if archive_async:
        pgbackrest.enable_async_archive_get()
    subprocess.run(["sync"], check=True)
    log(f"restore: {name} {' '.join(options[1:])} restore, then PostgreSQL replays the WAL")
    t = time.monotonic()
    pgbackrest.run(*options, "restore")
    laid_out = time.monotonic() - t
    cluster.start(timeout=600)
    _wait(lambda: cluster.psql("SELECT pg_is_in_recovery()").strip() == "f", timeout=1800, what="recovery")
    seconds = time.monotonic() - t
    return _checked(name, cluster, seconds, laid_out, expected)


def _deskvault_restore(repo, scratch: Path, expected: dict[str, str], before) -> dict[str, float]:
    before()
    into = scratch / "restored-deskvault"
    cluster = PgCluster(into, free_port())
    _RESTORED.append(cluster)
    subprocess.run(["sync"], check=True)
    log("restore: deskvault plan_restore + restore(start=True): PostgreSQL replays as the WAL arrives")
    laid_out = 0.0

    def progress(message: str) -> None:
        nonlocal laid_out
        if message.startswith("starting PostgreSQL"):
            laid_out = time.monotonic() - t  # the base is in place; the WAL may still be downloading
        log(f"restore: deskvault: {message}")

    t = time.monotonic()
    plan = plan_restore(repo, TARGET, None)
    # Returns once pg_is_in_recovery() is false, polled every 0.5 s as for the pgBackRest copies.
    restore(repo, plan, into, start=True, port=cluster.port, on_progress=progress)
    seconds = time.monotonic() - t
    return _checked("deskvault", cluster, seconds, laid_out, expected)


def _checked(
    tool: str, cluster: PgCluster, seconds: float, laid_out: float, expected: dict[str, str]
) -> dict[str, float]:
    found = _fingerprint(cluster)
    if found != expected:
        raise RuntimeError(f"{tool}'s restored cluster differs from the source: {found} != {expected}")
    log(f"restore: {tool} took {seconds:.1f}s; marker and row counts match the source")
    size = _database_bytes(cluster)
    cluster.destroy()
    return {"seconds": seconds, "files_seconds": laid_out, "database_mib": size / MIB, "verified": True}


def _deskvault_stored(repo) -> dict[str, float]:
    entries = list(repo.store.list_entries(f"targets/{TARGET}/"))
    wal = sum(e.size for e in entries if "/wal/" in e.key)
    return {"backup_mib": (sum(e.size for e in entries) - wal) / MIB, "wal_mib": wal / MIB}


def _report(db_bytes, wal, args, backup, restores, stored, loads, target_time, pgbackrest, settings) -> None:
    def rounded(values: dict) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in values.items()}

    wal_bytes = wal["bytes"]
    restore_bytes = db_bytes + wal_bytes
    for values in backup.values():
        values["mib_per_s"] = db_bytes / values["seconds"] / MIB
    for values in restores.values():
        values["mib_per_s"] = restore_bytes / values["seconds"] / MIB
    result = {
        "database_mib": round(db_bytes / MIB),
        "wal_generated_mib": round(wal_bytes / MIB),
        "wal_stands_in_for": (
            f"a day of WAL: pgbench -i -s {PGBENCH_SCALE}, then {args.wal_seconds}s of pgbench -c 2 -j 2 "
            f"({wal['pgbench_transactions']} transactions, {wal['pgbench_tps']:.0f} tps): "
            f"{wal_bytes / MIB:.0f} MiB of WAL"
        ),
        "backup": {tool: rounded(v) for tool, v in backup.items()},
        "restore_to": f"latest: marker committed, segment switched, archived by both at {target_time:%FT%TZ}",
        "restore": {tool: rounded(v) for tool, v in restores.items()},
        "stored": {tool: rounded(v) for tool, v in stored.items()},
        "ratio_deskvault_over_pgbackrest": {
            "backup_seconds": round(backup["deskvault"]["seconds"] / backup["pgbackrest"]["seconds"], 2),
            "restore_seconds": round(restores["deskvault"]["seconds"] / restores["pgbackrest"]["seconds"], 2),
        },
        # Not the settings: pgBackRest's archive-get prefetching WAL in parallel, as deskvault does.
        "ratio_restore_vs_pgbackrest_archive_async": round(
            restores["deskvault"]["seconds"] / restores["pgbackrest_archive_async"]["seconds"], 2
        ),
        "goal": {"backup_seconds": "<= 1.0", "restore_seconds": "<= 1.0"},
        "throughput_bytes": "backup: database size; restore: database size + WAL generated (same for both)",
        "repositories": {
            "deskvault": f"S3 (SeaweedFS on this machine), zstd level {settings.repository.zstd_level}, "
            f"zstd threads {settings.repository.zstd_threads}, AES-256-GCM",
            "pgbackrest": "posix folder on local disk (favours pgBackRest)",
        },
        "pgbackrest_settings": pgbackrest.shown_settings(),
        "load_average_1_5_15": loads,
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


def _wait(predicate, *, timeout: float = 60, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def _database_bytes(cluster: PgCluster) -> int:
    return int(cluster.psql("SELECT sum(pg_database_size(datname)) FROM pg_database").strip())


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    sys.exit(main())
