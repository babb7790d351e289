"""pgBackRest as the benchmarks' peer: one configuration (one stanza, one repository) per storage.

Every configuration gets the same options, chosen to match what deskvault pays for and uses: zstd level 3,
AES-256-CBC, `process-max` = the machine's cores, `archive-async=y` for archive-push and archive-get (WAL
pushed and prefetched in parallel, through a spool folder), `start-fast=y`. The repository is either S3
(the benchmark's SeaweedFS over HTTPS, certificate checks off, path-style URIs, a prefix of its own in
deskvault's bucket) or a posix folder on the local disk. Several configurations archive the same source
by chaining their archive-push commands (`archive_command`). Every timed command runs under
`bench/peak_rss.py`, so its wall time and peak RSS are measured alike for each tool.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import log
from bench.peak_rss import Measured
from workers.engines.postgresql.cluster import PgCluster, free_port, hand_over, server_user

MIB = 2**20
STANZA = "bench"
OPTIONS = {
    "compress-type": "zst",
    "compress-level": "3",
    "process-max": str(os.cpu_count() or 1),
    "start-fast": "y",
    "archive-async": "y",
    "repo1-cipher-type": "aes-256-cbc",
    "repo1-retention-full": "2",
}
SECRET_OPTIONS = ("repo1-cipher-pass", "repo1-s3-key", "repo1-s3-key-secret")


@dataclass(frozen=True)
class S3Repo:
    """Where an S3 repository lives: the HTTPS listener pgBackRest talks to, and who it is there."""

    host: str
    https_port: int
    bucket: str
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    client: object = field(repr=False, compare=False)  # a raw boto3 client, for sizes only


@dataclass
class PgBackRest:
    """One pgBackRest configuration for `source`, with its repository on `storage` ("s3" or "posix")."""

    home: Path
    source: PgCluster
    storage: str
    s3: S3Repo | None = None

    def __post_init__(self) -> None:
        if self.storage not in ("s3", "posix") or (self.storage == "s3") != (self.s3 is not None):
            raise ValueError(f"storage {self.storage!r} with s3={self.s3!r}")
        self.config = self.home / "pgbackrest.conf"
        self.spool_path = self.home / "spool"
        self.options = {
            **OPTIONS,
            "repo1-cipher-pass": secrets.token_urlsafe(32),
            "spool-path": str(self.spool_path),
            "log-path": str(self.home / "log"),
            "lock-path": str(self.home / "lock"),
        }
        if self.s3 is not None:
            # A leading slash: pgBackRest's repo paths are absolute; in the bucket it is a key prefix.
            self.repo_path = f"/pgbackrest-{uuid.uuid4().hex[:8]}"
            self.options |= {
                "repo1-type": "s3",
                "repo1-path": self.repo_path,
                "repo1-s3-bucket": self.s3.bucket,
                "repo1-s3-endpoint": self.s3.host,
                "repo1-storage-port": str(self.s3.https_port),
                "repo1-s3-region": self.s3.region,
                "repo1-s3-uri-style": "path",
                "repo1-storage-verify-tls": "n",
                "repo1-s3-key": self.s3.access_key,
                "repo1-s3-key-secret": self.s3.secret_key,
            }
        else:
            self.repo_path = str(self.home / "repo")
            self.options |= {"repo1-type": "posix", "repo1-path": self.repo_path}

    @property
    def name(self) -> str:
        """How results name this peer: its storage and its archive mode."""
        return f"pgbackrest_{self.storage}_async"

    def configure(self) -> None:
        folders = [self.spool_path, self.home / "log", self.home / "lock"]
        if self.storage == "posix":
            folders.append(Path(self.repo_path))
        for folder in folders:
            folder.mkdir(parents=True)
        lines = ["[global]", *(f"{k}={v}" for k, v in self.options.items()), "", f"[{STANZA}]"]
        lines += [f"pg1-path={self.source.datadir}", f"pg1-port={self.source.port}", ""]
        self.config.write_text("\n".join(lines))
        self.config.chmod(0o600)  # it holds the cipher passphrase and the S3 secret
        hand_over(self.home)

    def archive_command(self) -> str:
        return f"pgbackrest --config={self.config} --stanza={STANZA} archive-push %p"

    def command(self, *args: str) -> list[str]:
        user = server_user()
        # The scratch clusters listen on TCP only and pg1-socket-path takes a directory, so the host is
        # left to libpq, which reads PGHOST.
        return [
            *(["runuser", "-u", user, "--"] if user else []),
            "env",
            "PGHOST=127.0.0.1",
            "pgbackrest",
            f"--config={self.config}",
            f"--stanza={STANZA}",
            "--log-level-console=info",
            *args,
        ]

    def run(self, *args: str, timeout: float = 3600) -> str:
        """A pgbackrest command as the server's user; its output (info level) returned."""
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(self._failed(args, proc.returncode, proc.stdout + proc.stderr))
        return proc.stdout

    def measured(self, *args: str, out: Path, timeout: float = 3600) -> dict[str, float]:
        """A pgbackrest command under the peak-RSS wrapper: seconds and peak RSS."""
        t = time.monotonic()
        run = Measured(self.command(*args), out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = run.proc.communicate(timeout=timeout)
        code = run.wait()
        seconds = time.monotonic() - t
        if code != 0:
            raise RuntimeError(self._failed(args, code, output.decode(errors="replace")))
        return {"seconds": seconds, **run.peaks_mib()}

    def _failed(self, args: tuple[str, ...], code: int, output: str) -> str:
        shown = output.strip()[-2000:]
        for name in SECRET_OPTIONS:
            if self.options.get(name):
                shown = shown.replace(self.options[name], "<secret>")
        return f"pgbackrest {' '.join(args)} ({self.name}) failed (exit {code}): {shown}"

    def backup(self, kind: str, out: Path) -> dict[str, float]:
        """`backup --type=KIND`, timed; with the backup's size and the bytes it added to the repository."""
        log(f"backup: {self.name} --type={kind}")
        result = self.measured(f"--type={kind}", "backup", out=out)
        last = self.info()[0]["backup"][-1]
        log(f"backup: {self.name} {kind} took {result['seconds']:.1f}s")
        return {
            **result,
            # size: the database as restored; delta: what this backup copied (all of it for a full)
            "database_mib": last["info"]["size"] / MIB,
            "plain_mib": last["info"]["delta"] / MIB,
            "stored_mib": last["info"]["repository"]["delta"] / MIB,
            "timestamp_seconds": last["timestamp"]["stop"] - last["timestamp"]["start"],
        }

    def info(self) -> list[dict]:
        return json.loads(self.run("--output=json", "info"))

    def restore(self, into: Path, out: Path) -> tuple[PgCluster, dict[str, float]]:
        """Restore the latest backup into `into` and recover to the end of the archive; the running copy
        and the timings (start of the command until pg_is_in_recovery() is false, polled every 0.5 s)."""
        into.mkdir(mode=0o700)
        hand_over(into)
        cluster = PgCluster(into, free_port())
        # --archive-mode=off: the restored copy must not push its new timeline into the stanza.
        options = [f"--pg1-path={into}", "--type=default", "--archive-mode=off"]
        log(f"restore: {self.name} {' '.join(options[1:])} restore, then PostgreSQL replays the WAL")
        t = time.monotonic()
        result = self.measured(*options, "restore", out=out)
        laid_out = time.monotonic() - t
        cluster.start(timeout=600)
        deadline = time.monotonic() + 3600
        while cluster.psql("SELECT pg_is_in_recovery()").strip() != "f":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: recovery of {into} did not end within an hour")
            time.sleep(0.5)
        seconds = time.monotonic() - t
        return cluster, {
            "seconds": seconds,
            "files_seconds": laid_out,
            "replay_seconds": seconds - laid_out,
            "peak_rss_mib": result["peak_rss_mib"],
            "tree_peak_rss_mib": result["tree_peak_rss_mib"],
            "restore_command": _restore_command(into),
        }

    def stop(self) -> None:
        """Refuse further commands on the stanza (a restored copy's archive-push fails instead)."""
        self.run("stop")

    def stored(self) -> dict[str, float]:
        """MiB in the repository: backups, and the WAL archive."""
        if self.s3 is not None:
            from bench.seaweed import stored_bytes

            listed = stored_bytes(self.s3.client, self.s3.bucket, self.repo_path.lstrip("/") + "/")
            wal = sum(size for key, size in listed if "/archive/" in key)
            return {"backup_mib": (sum(size for _, size in listed) - wal) / MIB, "wal_mib": wal / MIB}
        return {
            "backup_mib": _du(Path(self.repo_path) / "backup") / MIB,
            "wal_mib": _du(Path(self.repo_path) / "archive") / MIB,
        }

    def shown_settings(self) -> dict[str, str]:
        shown = {k: ("<secret>" if k in SECRET_OPTIONS else v) for k, v in self.options.items()}
        shown["restore"] = "--type=default --archive-mode=off --pg1-path=<new folder>"
        return shown


def start_archiving(source: PgCluster, peers: list[PgBackRest]) -> None:
    """Create and start `source` with WAL archived by every configuration (archive-push commands
    chained: a segment counts as archived once each holds it).

    The stanzas are created before archive_command is set: a push that fails before its stanza exists
    would make PostgreSQL's archiver back off for a minute.
    """
    source.initdb(extra_conf="archive_mode = on\narchive_command = ''\n")
    source.start()
    for peer in peers:
        peer.run("stanza-create")
    command = " && ".join(p.archive_command() for p in peers)
    source.psql(f"ALTER SYSTEM SET archive_command = {quoted(command)}")
    source.psql("SELECT pg_reload_conf()")


def quoted(text: str) -> str:
    """`text` as an SQL string literal (single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def _restore_command(into: Path) -> str:
    """The restore_command pgBackRest wrote, to show which configuration the copy fetched WAL with."""
    try:
        for line in (into / "postgresql.auto.conf").read_text().splitlines():
            if line.startswith("restore_command"):
                return line.split("=", 1)[1].strip().strip("'")
    except OSError:
        pass
    return ""


def _du(path: Path) -> int:
    done = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return int(done.stdout.split()[0]) if done.returncode == 0 else 0
