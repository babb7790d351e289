"""deskvault as the benchmarks run it: its own processes, timed and measured as an operator would see them.

  WalStream      `deskvault wal-stream` for the target, a process of its own
  BackupWorker   a running `deskvault worker --pool backup` (under the peak-RSS wrapper) answering
                 published backup-due events; a backup is timed from publish to its committed manifest
  cli_restore    `deskvault restore --start` in a process of its own, timed from its start until it
                 returns (recovery ended: it polls pg_is_in_recovery() every 0.5 s), the moment the base
                 was in place read from its progress line "starting PostgreSQL..."
  replay_alone   a restore with every WAL file downloaded first (restore without start), then only
                 PostgreSQL's start to promotion timed: the replay stage alone
Only the committed manifests (`catalog.scan_manifests`) and the restore API are relied upon.
"""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

from bench.common import ROOT, backup_worker_command, deskvault_command, log, publish_backup, queue_consumers
from bench.peak_rss import Measured
from workers.engines.postgresql.cluster import PgCluster, free_port
from workers.engines.postgresql.restore import plan_restore, restore
from workers.repository import catalog

MIB = 2**20


def wait(predicate, *, timeout: float = 60, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


class WalStream:
    """`deskvault wal-stream --target T` running until `stop`."""

    def __init__(self, settings, target: str, log_file: Path) -> None:
        self.log_file = log_file
        command = deskvault_command(settings, "wal-stream", "--target", target, "--no-metrics")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log_file.open("w"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"deskvault wal-stream exited ({self.proc.returncode}); see {self.log_file}")


def manifests(repo, target: str) -> list[dict]:
    return catalog.scan_manifests(repo, target)[0]


class BackupWorker:
    """A `deskvault worker --pool backup` under the peak-RSS wrapper, started and ready for events."""

    def __init__(self, settings, repo, target: str, rss_file: Path) -> None:
        self.settings, self.repo, self.target = settings, repo, target
        t = time.monotonic()
        self.run = Measured(backup_worker_command(settings, burst=False), rss_file, cwd=ROOT)
        wait(lambda: queue_consumers(settings, "backup") > 0, timeout=60, what="the backup worker")
        self.startup_seconds = time.monotonic() - t

    def take(self, kind: str, before_publish=None) -> dict:
        """Publish backup-due(kind) and wait for its manifest; timings and sizes from the manifest."""
        known = {m["backup_id"] for m in manifests(self.repo, self.target)}
        if before_publish is not None:
            before_publish()
        log(f"backup: deskvault {kind}, from publishing backup-due(kind={kind}) to the committed manifest")
        t = time.monotonic()
        publish_backup(self.settings, self.target, kind)

        deadline = t + 3600
        listed = self._manifest_keys()
        while True:
            if self.run.proc.poll() is not None:
                raise RuntimeError(f"the backup worker exited ({self.run.proc.returncode}) during a backup")
            # Listing is cheap; reading (decrypting) every manifest only once the listing changed.
            if (now := self._manifest_keys()) != listed or not now:
                listed = now
                new = [m for m in manifests(self.repo, self.target) if m["backup_id"] not in known]
                if new:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for the {kind} backup's manifest")
            time.sleep(0.1)
        seconds = time.monotonic() - t
        manifest = new[-1]
        if manifest["kind"] != kind:
            raise RuntimeError(f"asked for a {kind} backup, the worker committed a {manifest['kind']}")
        log(f"backup: deskvault {kind} took {seconds:.1f}s")
        self.last_manifest = manifest
        return {
            "seconds": seconds,
            "pipeline_seconds": pipeline_seconds(manifest),
            "plain_mib": manifest["plain_size"] / MIB,
            "stored_mib": manifest["stored_size"] / MIB,
            "objects": len(manifest.get("objects", ())),
            "backup_id": manifest["backup_id"],
        }

    def _manifest_keys(self) -> frozenset[str]:
        """Manifest keys under the target (empty if the layout names them otherwise: then every poll
        reads the manifests)."""
        name = getattr(catalog, "MANIFEST_NAME", "manifest.dv")
        keys = self.repo.list_keys(f"targets/{self.target}/")
        return frozenset(k for k in keys if k.endswith("/" + name))

    def stop(self) -> dict[str, float]:
        """Stop the worker; its peak RSS (largest process) and its process tree's sampled peak."""
        self.run.terminate()
        self.run.wait(timeout=120)
        return {**self.run.peaks_mib(), "startup_seconds": self.startup_seconds}


def pipeline_seconds(manifest: dict) -> float:
    started = datetime.fromisoformat(manifest["started_at"].replace("Z", "+00:00"))
    finished = datetime.fromisoformat(manifest["finished_at"].replace("Z", "+00:00"))
    return (finished - started).total_seconds()


def cli_restore(settings, target: str, into: Path, rss_file: Path, *goal: str) -> tuple[PgCluster, dict]:
    """`deskvault restore --target T --into INTO --start --port P [goal...]` (default: latest), timed
    and measured."""
    port = free_port()
    command = deskvault_command(
        settings, "restore", "--target", target, "--into", str(into), "--start", "--port", str(port), *goal
    )
    log("restore: deskvault restore --start (CLI): PostgreSQL replays as the WAL arrives")
    lines: list[tuple[float, str]] = []
    t = time.monotonic()
    run = Measured(command, rss_file, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def read() -> None:
        for raw in run.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append((time.monotonic() - t, line))
            log(f"restore: deskvault: {line.strip()}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = run.wait(timeout=6 * 3600)
    seconds = time.monotonic() - t
    reader.join(timeout=10)
    if code != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"deskvault restore failed (exit {code}):\n{tail}")
    laid_out = next((at for at, line in lines if line.strip().startswith("starting PostgreSQL")), 0.0)
    first = lines[0][0] if lines else 0.0
    return PgCluster(into, port), {
        "seconds": seconds,
        "files_seconds": laid_out,
        "replay_seconds": seconds - laid_out,
        "first_output_seconds": first,  # interpreter start-up and planning, before anything downloads
        **run.peaks_mib(),
    }


def replay_alone(repo, target: str, into: Path, before_start=None) -> tuple[PgCluster, float]:
    """Restore with every WAL file local first, then time PostgreSQL's start to promotion only."""
    log("stage alone: replay: restoring with all WAL downloaded first (untimed)")
    plan = plan_restore(repo, target, None)
    restore(repo, plan, into, start=False, on_progress=lambda m: None)
    cluster = PgCluster(into, free_port())
    if before_start is not None:
        before_start()
    t = time.monotonic()
    cluster.start(timeout=600)
    wait(lambda: cluster.psql("SELECT pg_is_in_recovery()").strip() == "f", timeout=3600, what="replay")
    seconds = time.monotonic() - t
    log(f"stage alone: replay: {seconds:.2f}s from start to promotion")
    return cluster, seconds


def restore_wal_objects(repo, target: str) -> list[dict]:
    """The WAL files a restore of the latest point reads (history files first), as {key}."""
    plan = plan_restore(repo, target, None)
    entries = [*getattr(plan, "history", ()), *getattr(plan, "wal", ())]
    return [{"key": e.key} for e in entries]


def archived_by_postgres(source, segment: str) -> bool:
    """PostgreSQL's archiver (the peer's archive_command) has archived `segment` or a later one."""
    last = source.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").strip()
    return len(last) == len(segment) and last >= segment


def in_deskvault_archive(raw, bucket: str, prefix: str, target: str, segment: str) -> bool:
    """A complete (not partial) object of `segment` in deskvault's WAL archive of `target`."""
    from bench.seaweed import stored_bytes

    listed = stored_bytes(raw, bucket, f"{prefix}targets/{target}/")
    return any(
        "/wal/" in key and key.rsplit("/", 1)[1].startswith(segment) and ".partial" not in key
        for key, _ in listed
    )
