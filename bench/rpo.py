"""Benchmark: the live RPO of the log layer -- how long after a commit its WAL is in the bucket.

A scratch PostgreSQL cluster is streamed by one `WalStreamer` (pg_receivewal over a replication slot,
uploads every `upload_interval` seconds: complete segments, and the segment being written as
`<segment>.partial`). Each sample commits a marker row in one transaction, reading its xid, and notes the
insert LSN inside the transaction and right after the commit: the commit record lies between the two.
Then, every 0.25 s (at most 120 s), the archive is listed; the objects of the segments that can hold the
commit (complete, or else partial) are downloaded through the repository (decrypted, decompressed)
whenever their upload time changed, and `pg_waldump` reads them. The sample ends when pg_waldump shows the
COMMIT record of that xid: the WAL is then in the bucket, whole and readable. RPO = detection - commit.

Markers are committed 0-2 s apart at random, from a thread of their own that never waits for a detection,
so commit times are independent of the upload schedule (several samples can be in flight at once). With
no other writes (`--background-tps 0`, the default) the segment stays partial: the case the partial
upload is for. One warm-up sample (the first upload to a fresh prefix) is not counted.

Run: .venv/bin/python bench/rpo.py [--samples 100] [--upload-interval 5] [--background-tps 0] [--keep]
Needs SeaweedFS via .deskvault (started if it is not running). Progress goes to stderr, the result (JSON)
to stdout. Goal: p99 <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyodbc  # noqa: E402

from deskvault.local import seaweedfs  # noqa: E402
from deskvault_core.config import WalSettings, load_settings  # noqa: E402
from workers.context import open_repository  # noqa: E402
from workers.engines.postgresql.cluster import PgCluster, free_port  # noqa: E402
from workers.engines.postgresql.walarchive import WalEntry, list_wal  # noqa: E402
from workers.engines.postgresql.walnames import Segment, parse_lsn, parse_size  # noqa: E402
from workers.engines.postgresql.walstream import WalStreamer  # noqa: E402
from workers.repository.errors import ObjectNotFound  # noqa: E402
from workers.repository.keyring import Keyring  # noqa: E402
from workers.repository.objects import ObjectRepository  # noqa: E402

TARGET = "bench"
GOAL_P99_S = 60.0
POLL_S = 0.25
SAMPLE_TIMEOUT_S = 120.0
MAX_GAP_S = 2.0
# pg_waldump prints a transaction's commit as "... tx: <xid>, lsn: ..., desc: COMMIT <timestamp>..."
COMMIT_RE = re.compile(r"\btx:\s*(\d+),.*\bdesc: COMMIT\b")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument(
        "--upload-interval",
        type=float,
        default=float(WalSettings().upload_interval_seconds),
        help="seconds between the streamer's uploads (default: the production default)",
    )
    parser.add_argument("--background-tps", type=float, default=0.0, help="other commits per second")
    parser.add_argument("--seed", type=int, default=None, help="seed for the spacing between samples")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and the bucket objects")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    if args.upload_interval < 1:
        # Object upload times have a resolution of one second; a re-upload is only seen by its time.
        parser.error("--upload-interval must be at least 1 second")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rng = random.Random(args.seed)

    scratch = Path(tempfile.mkdtemp(prefix="deskvault-rpo-"))
    scratch.chmod(0o755)
    cluster = PgCluster(scratch / "pg", free_port(), tcp=True)
    stop_streaming, stop_load, stop_commits = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    connections: list[pyodbc.Connection] = []
    repo: ObjectRepository | None = None
    try:
        _log(f"scratch cluster on port {cluster.port}")
        cluster.initdb()
        cluster.start()
        cluster.psql(
            "CREATE TABLE rpo_marker (id bigserial PRIMARY KEY, sample int NOT NULL,"
            " written_at timestamptz NOT NULL DEFAULT clock_timestamp());"
            "CREATE TABLE rpo_load (id bigserial PRIMARY KEY, payload text NOT NULL)"
        )
        settings = _settings(scratch, cluster)
        repo = open_repository(settings)
        repo.store.ensure_bucket()

        target = settings.target(TARGET)
        streamer = WalStreamer(target, repo, scratch / "spool", args.upload_interval)
        threads.append(threading.Thread(target=streamer.run, args=(stop_streaming,), name="wal-rpo"))
        threads[-1].start()
        _wait(
            lambda: (
                cluster.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").strip()
                == "1"
            ),
            timeout=60,
            what="pg_receivewal streaming (pg_stat_replication)",
        )
        _log(f"streamer connected; upload interval {args.upload_interval:g} s")

        if args.background_tps > 0:
            load = _connect(cluster, autocommit=True)
            connections.append(load)
            threads.append(
                threading.Thread(
                    target=_background_load, args=(load, args.background_tps, stop_load), name="load"
                )
            )
            threads[-1].start()
            _log(f"background load: {args.background_tps:g} commits/s")

        writer, probe = _connect(cluster, autocommit=False), _connect(cluster, autocommit=True)
        connections += [writer, probe]
        checker = ArchiveChecker(
            repo,
            scratch / "check",
            Path(target.pg_bin) / "pg_waldump",
            timeline=int(cluster.psql("SELECT timeline_id FROM pg_control_checkpoint()").strip()),
            segment_size=parse_size(cluster.psql("SHOW wal_segment_size").strip()),
        )

        # The first upload to a fresh prefix pays for a volume allocation: one sample, not counted.
        warm_up = Queue()
        warm_up.put(_commit_marker(0, writer, probe))
        (first,) = _detect(warm_up, 1, checker, threads[0], lambda: None)
        _log(f"warm-up sample: {first.rpo_s:.2f} s (not counted)")

        # Commits come from their own thread on their own clock, so no commit waits for a detection: the
        # commit times know nothing of the upload schedule. (Committing a fixed random gap after each
        # detection would not do: a detection follows an upload, so the next commit's phase in the
        # upload cycle would be the gap itself.)
        committed: Queue[Pending] = Queue()
        failures: list[BaseException] = []
        threads.append(
            threading.Thread(
                target=_commit_markers,
                args=(args.samples, writer, probe, rng, committed, failures, stop_commits),
                name="markers",
            )
        )
        threads[-1].start()

        def check_committer() -> None:
            if failures:
                raise RuntimeError(f"the marker commits failed: {failures[0]}")

        samples = _detect(committed, args.samples, checker, threads[0], check_committer)
        _report(samples, checker, args)
        return 0
    finally:
        stop_commits.set()
        stop_load.set()
        stop_streaming.set()
        for thread in reversed(threads):
            thread.join(timeout=60)
            if thread.is_alive():
                _log(f"warning: thread {thread.name} did not stop within 60 s")
        for conn in connections:
            conn.close()
        cluster.destroy()
        if not args.keep:
            if repo is not None:
                _delete_all(repo)
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            _log(f"kept {scratch}")


def _settings(scratch: Path, cluster: PgCluster):
    s3 = seaweedfs.ensure_running(ROOT / ".deskvault")
    key_file = scratch / "keys.json"
    Keyring.create(key_file)
    config = scratch / "deskvault.toml"
    config.write_text(f"""
[repository]
bucket = "deskvault-bench"
prefix = "rpo-{uuid.uuid4().hex[:8]}/"
endpoint = "{s3.endpoint_url}"
access_key = "{s3.access_key}"
secret_key = "{s3.secret_key}"
key_file = "{key_file}"
[wal]
spool_dir = "{scratch / "spool"}"
[targets.{TARGET}]
engine = "postgresql"
conninfo = "{cluster.conninfo}"
""")
    return load_settings(config, env={})


@dataclass
class Sample:
    n: int
    xid: int
    rpo_s: float
    check_s: float  # list + download + pg_waldump of the poll that found the commit (part of rpo_s)
    source: str  # the object(s) that held the commit


@dataclass
class _Local:
    key: str
    uploaded_at: datetime
    path: Path


@dataclass
class ArchiveChecker:
    """Answers "is the COMMIT of xid X, written between two LSNs, in the bucket?" from the bucket alone."""

    repo: ObjectRepository
    folder: Path
    waldump: Path
    timeline: int
    segment_size: int
    downloads: int = 0
    last_waldump_error: str = ""
    _local: dict[Segment, _Local] = field(default_factory=dict)
    _dumped: dict[tuple[tuple[str, datetime], ...], set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def holds_commit(
        self, archived: dict[Segment, WalEntry], xid: int, lsn_from: int, lsn_to: int
    ) -> str | None:
        """The object names holding the commit, or None if the bucket does not hold it (yet)."""
        first = Segment.of(self.timeline, lsn_from, self.segment_size)
        last = Segment.of(self.timeline, lsn_to - 1, self.segment_size)
        # The record lies in first..last; a range is read from `first` so a record crossing into the next
        # segment is only printed once both halves are there.
        for end in range(first.segno, last.segno + 1):
            wanted = [Segment(self.timeline, s) for s in range(first.segno, end + 1)]
            if any(s not in archived for s in wanted):
                return None
            try:
                committed = self._committed([archived[s] for s in wanted], wanted)
            except ObjectNotFound:  # a partial superseded by its complete segment between list and get
                return None
            if xid in committed:
                return ", ".join(archived[s].filename for s in wanted)
        return None

    def archived(self) -> dict[Segment, WalEntry]:
        """Each segment's newest object: the complete segment if there is one, else its partial."""
        found: dict[Segment, WalEntry] = {}
        for entry in list_wal(self.repo, TARGET, self.segment_size):
            if entry.segment is None or entry.segment.timeline != self.timeline:
                continue
            if entry.segment not in found or found[entry.segment].partial:
                found[entry.segment] = entry
        return found

    def _committed(self, entries: list[WalEntry], segments: list[Segment]) -> set[int]:
        version = tuple((e.key, e.uploaded_at) for e in entries)
        if version in self._dumped:
            return self._dumped[version]
        for entry, segment in zip(entries, segments, strict=True):
            self._fetch(entry, segment)
        for old in [s for s in self._local if s < segments[0]]:
            self._local.pop(old).path.unlink(missing_ok=True)
        names = [segments[0].name(self.segment_size), segments[-1].name(self.segment_size)]
        # A partial segment ends in zeros: pg_waldump reads the records and then exits non-zero.
        proc = subprocess.run(
            [str(self.waldump), "--path", str(self.folder), "--rmgr", "Transaction", *names],
            capture_output=True,
            text=True,
            timeout=60,
        )
        committed = {int(m.group(1)) for m in COMMIT_RE.finditer(proc.stdout)}
        self.last_waldump_error = proc.stderr.strip()[-300:]
        self._dumped = {version: committed}
        return committed

    def _fetch(self, entry: WalEntry, segment: Segment) -> None:
        have = self._local.get(segment)
        if have is not None and (have.key, have.uploaded_at) == (entry.key, entry.uploaded_at):
            return
        path = self.folder / segment.name(self.segment_size)
        partial = path.with_name(path.name + ".download")
        with partial.open("wb") as f:
            for chunk in self.repo.get_stream(entry.key):
                f.write(chunk)
        partial.replace(path)
        self._local[segment] = _Local(entry.key, entry.uploaded_at, path)
        self.downloads += 1


@dataclass(frozen=True)
class Pending:
    """A committed marker: its commit record lies in [lsn_from, lsn_to)."""

    n: int
    xid: int
    lsn_from: int
    lsn_to: int
    committed: float  # time.monotonic() right after COMMIT returned


def _commit_marker(n: int, writer: pyodbc.Connection, probe: pyodbc.Connection) -> Pending:
    cur = writer.cursor()
    cur.execute("INSERT INTO rpo_marker (sample) VALUES (?)", n)
    cur.execute("SELECT txid_current(), pg_current_wal_insert_lsn()::text")
    xid64, lsn_text = cur.fetchone()
    writer.commit()
    committed = time.monotonic()
    lsn_after = probe.cursor().execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    # pg_waldump prints the 32-bit xid, without its epoch.
    return Pending(n, int(xid64) & 0xFFFFFFFF, parse_lsn(lsn_text), parse_lsn(lsn_after), committed)


def _commit_markers(
    count: int,
    writer: pyodbc.Connection,
    probe: pyodbc.Connection,
    rng: random.Random,
    out: Queue[Pending],
    failures: list[BaseException],
    stop: threading.Event,
) -> None:
    try:
        for n in range(1, count + 1):
            if stop.wait(rng.uniform(0, MAX_GAP_S)):
                return
            out.put(_commit_marker(n, writer, probe))
    except BaseException as e:  # handed to the main thread, which stops the run
        failures.append(e)


def _detect(
    committed: Queue[Pending], count: int, checker: ArchiveChecker, streamer: threading.Thread, check
) -> list[Sample]:
    """Poll the bucket until each of `count` commits is found in it; bounded by SAMPLE_TIMEOUT_S each."""
    pending: list[Pending] = []
    samples: list[Sample] = []
    last_commit = time.monotonic()
    while len(samples) < count:
        check()
        if not streamer.is_alive():
            raise RuntimeError("the WAL streamer thread died")
        while not committed.empty():
            pending.append(committed.get_nowait())
            last_commit = time.monotonic()
        now = time.monotonic()
        if now - last_commit > SAMPLE_TIMEOUT_S:
            raise RuntimeError(f"no marker committed for {SAMPLE_TIMEOUT_S:.0f} s")
        for p in pending:
            if now - p.committed > SAMPLE_TIMEOUT_S:
                raise RuntimeError(
                    f"sample {p.n}: the commit of xid {p.xid} was not in the bucket after"
                    f" {SAMPLE_TIMEOUT_S:.0f} s (pg_waldump: {checker.last_waldump_error or 'no error'})"
                )
        if pending:
            archived = checker.archived()
            for p in list(pending):
                source = checker.holds_commit(archived, p.xid, p.lsn_from, p.lsn_to)
                if source is None:
                    continue
                found = time.monotonic()
                pending.remove(p)
                samples.append(Sample(p.n, p.xid, found - p.committed, found - now, source))
                if p.n:
                    _log(f"sample {p.n}/{count}: {found - p.committed:.2f} s ({source})")
        time.sleep(POLL_S)
    return samples


def _background_load(conn: pyodbc.Connection, tps: float, stop: threading.Event) -> None:
    cur = conn.cursor()
    while not stop.wait(1 / tps):
        cur.execute("INSERT INTO rpo_load (payload) VALUES (repeat('x', 200))")


def _report(samples: list[Sample], checker: ArchiveChecker, args: argparse.Namespace) -> None:
    rpo = sorted(s.rpo_s for s in samples)
    result: dict[str, object] = {
        "samples": len(rpo),
        "upload_interval_s": args.upload_interval,
        "background_tps": args.background_tps,
        "mean_s": round(statistics.fmean(rpo), 2),
        "p50_s": round(_percentile(rpo, 50), 2),
        "p95_s": round(_percentile(rpo, 95), 2),
        "p99_s": round(_percentile(rpo, 99), 2),
        "max_s": round(rpo[-1], 2),
        "min_s": round(rpo[0], 2),
        "detection_check_mean_s": round(statistics.fmean(s.check_s for s in samples), 3),
        "downloads": checker.downloads,
        "found_in_partial": sum(".partial" in s.source for s in samples),
        "goal": f"p99 <= {GOAL_P99_S:.0f} s",
        "p99_vs_goal": round(_percentile(rpo, 99) / GOAL_P99_S, 3),
    }
    print(json.dumps(result, indent=2))


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _connect(cluster: PgCluster, *, autocommit: bool) -> pyodbc.Connection:
    return pyodbc.connect(
        f"DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT={cluster.port};DATABASE=postgres;UID=postgres;",
        autocommit=autocommit,
    )


def _delete_all(repo: ObjectRepository) -> None:
    """Remove this run's objects (its prefix is its own)."""
    try:
        for listed in list(repo.store.list_entries()):
            repo.store.delete(listed.key)
    except Exception as e:  # cleanup must not hide the run's own error
        _log(f"warning: could not delete the run's objects: {e}")


def _wait(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def _log(message: str) -> None:
    print(f"[rpo] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
