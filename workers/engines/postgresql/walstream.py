"""The log layer: stream each target's WAL over replication and archive it within seconds.

`pg_receivewal` receives WAL as it is written, over a replication connection (the same access
`pg_basebackup` needs; nothing on the database host changes, and no process there has to run deskvault).
A physical replication slot makes the server keep WAL until it has been received, so a streamer that was
down leaves no gap. Every `upload_interval` seconds this module uploads what arrived to the repository
(compressed and encrypted like every object): complete segments once, and the segment still being
written as `<segment>.partial`, overwritten each time -- so a committed transaction is in the bucket
seconds after its commit, whether or not its segment is full.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from deskvault_core.config import TargetSettings
from deskvault_core.lifeline import stopping_with_me
from workers import metrics
from workers.engines.base import EngineError
from workers.engines.postgresql.commitindex import FileIndex, index_file, index_key
from workers.engines.postgresql.conninfo import libpq_env, split_password
from workers.engines.postgresql.readiness import slot_name
from workers.engines.postgresql.timelines import server_timeline
from workers.engines.postgresql.walarchive import PARTIAL, archivable, wal_key
from workers.engines.postgresql.walnames import SEGMENT_RE, Segment, format_lsn
from workers.engines.postgresql.walposition import WalPositions
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 60.0
READ_SIZE = 4 * 1024 * 1024
STATUS_INTERVAL_SECONDS = 1
# A receiver counts as up once it has outlived two of its reports; the round then waits this long at most
# for its report to pass the server's flush position.
SETTLED_SECONDS = 2.0 * STATUS_INTERVAL_SECONDS
CATCH_UP_SECONDS = 3.0 * STATUS_INTERVAL_SECONDS
PROBLEM_LENGTH = 300
RECEIVER_ERROR = "pg_receivewal: error: "
ABANDONED = "abandoned"  # spool WAL of a timeline branch the server's history left, kept for an operator


class WalStreamer:
    """Runs pg_receivewal for one target and uploads its output."""

    def __init__(
        self, target: TargetSettings, repo: ObjectRepository, spool: Path, upload_interval: float = 5.0
    ) -> None:
        self.target = target
        self.repo = repo
        self.spool = spool
        self.upload_interval = upload_interval
        self.conninfo, password = split_password(target.conninfo)
        self.env = libpq_env(password)
        self._partial_seen: dict[str, tuple[int, int]] = {}
        self._partial_index: dict[str, FileIndex] = {}
        self._awaiting_index: set[str] = set()  # archived complete segments whose index waits
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._errors: list[str] = []
        self._stderr_reader: threading.Thread | None = None
        self._problem: str | None = None
        self._positions = WalPositions(target.name, target.conninfo, slot_name(target.name))

    def run(self, stop: threading.Event) -> None:
        """Stream and upload until `stop` is set; pg_receivewal is restarted with backoff if it exits."""
        self.spool.mkdir(parents=True, exist_ok=True)
        backoff, restart_at = 1.0, 0.0
        try:
            while not stop.is_set():
                if self._proc is not None and self._proc.poll() is not None:
                    self._receiver_exited(backoff)
                    restart_at, backoff = time.monotonic() + backoff, min(backoff * 2, RESTART_BACKOFF_MAX)
                if self._proc is None and time.monotonic() >= restart_at and not self._start_receiver():
                    restart_at, backoff = time.monotonic() + backoff, min(backoff * 2, RESTART_BACKOFF_MAX)
                try:
                    if self._upload_round():
                        backoff = 1.0
                except Exception as e:  # the files stay in the spool; the next round retries
                    log.error("wal %s: upload failed: %s", self.target.name, e)
                    self._report_problem(f"upload failed: {e}")
                stop.wait(self.upload_interval)
        finally:
            self._stop_receiver()
            self._positions.close()
            self.upload_ready()

    def _upload_round(self) -> bool:
        """Upload what arrived. The live RPO moves to the round's start only when the round proves that
        everything the server had flushed by then is in the bucket: a receiver that has stayed up held it
        all before the upload began, and was still up after. Returns whether it moved."""
        began = time.time()
        receiver = self._proc if self._receiver_settled() else None
        flushed = held = None
        if receiver is not None:
            try:
                flushed = self._positions.server_flushed()
                held = self._held_once_caught_up(flushed)
            except EngineError as e:
                self._report_problem(str(e))
        proven = flushed is not None and held is not None and held >= flushed
        # Indexed after the proof: the partial segment's index then holds every commit made before `began`.
        self.upload_ready(covered_until=datetime.fromtimestamp(began, UTC) if proven else None)
        if flushed is None or held is None:
            return False
        metrics.WAL_BEHIND.labels(self.target.name).set(max(0, flushed - held))
        if proven and receiver is not None and receiver.poll() is None:
            metrics.WAL_ARCHIVED.labels(self.target.name).set(began)
            self._report_problem(None)
            return True
        self._report_problem("the receiver has not caught up with the server's flushed WAL")
        return False

    def _receiver_settled(self) -> bool:
        """Running, and for longer than its reports take: one that fails right after each start never is."""
        return (
            self._proc is not None
            and self._proc.poll() is None
            and time.monotonic() - self._started_at >= SETTLED_SECONDS
        )

    def _held_once_caught_up(self, flushed: int) -> int | None:
        """The receiver's held position, waiting up to CATCH_UP_SECONDS for it to reach `flushed`."""
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while True:
            held = self._positions.receiver_holds()
            if (held is not None and held >= flushed) or time.monotonic() >= deadline:
                return held
            time.sleep(0.2)

    def _receiver_exited(self, backoff: float) -> None:
        assert self._proc is not None
        if self._stderr_reader is not None:
            self._stderr_reader.join(timeout=2)  # its last words explain the exit
        code, self._proc = self._proc.returncode, None
        metrics.WAL_RECEIVER_EXITS.labels(self.target.name).inc()
        # "disconnected" follows the line that says why
        why = next((e for e in self._errors if e != "disconnected"), "")
        log.warning(
            "wal %s: pg_receivewal exited (code %s); restarting in %.0fs", self.target.name, code, backoff
        )
        self._report_problem(f"pg_receivewal exited (code {code})" + (f": {why}" if why else ""))

    def _report_problem(self, problem: str | None) -> None:
        """Say why the live RPO is not moving (metric and log), or that it moves again (None)."""
        problem = None if problem is None else " ".join(problem.split())[:PROBLEM_LENGTH]
        if problem == self._problem:
            return
        if self._problem is not None:
            metrics.WAL_PROBLEM.remove(self.target.name, self._problem)
        if problem is None:
            log.info("wal %s: caught up; the live RPO moves again", self.target.name)
        else:
            metrics.WAL_PROBLEM.labels(self.target.name, problem).set(1)
            log.warning("wal %s: the live RPO cannot move: %s", self.target.name, problem)
        self._problem = problem

    def _start_receiver(self) -> bool:
        slot = slot_name(self.target.name)
        bin_dir = Path(self.target.pg_bin)
        try:
            self._follow_server_timeline()
        except (EngineError, OSError, subprocess.SubprocessError) as e:
            self._report_problem(f"cannot follow the server's timeline: {e}")
            return False
        try:
            self._complete_cut_short_partials()
        except (EngineError, OSError) as e:
            self._report_problem(f"cannot check the spool's partial segments: {e}")
            return False
        create = subprocess.run(
            [
                str(bin_dir / "pg_receivewal"),
                "--dbname",
                self.conninfo,
                "--slot",
                slot,
                "--create-slot",
                "--if-not-exists",
                "--no-password",
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if create.returncode != 0:
            reason = create.stderr.strip()[:300]
            log.error("wal %s: cannot create replication slot %s: %s", self.target.name, slot, reason)
            self._report_problem(f"cannot create replication slot {slot}: {reason}")
            return False
        # Stopped with this process even if it is killed outright: left running, it would hold the slot.
        self._proc = subprocess.Popen(
            stopping_with_me(
                [
                    str(bin_dir / "pg_receivewal"),
                    "--dbname",
                    self.conninfo,
                    "--slot",
                    slot,
                    "--directory",
                    str(self.spool),
                    "--no-loop",
                    "--no-password",
                    # fsync, then report: the slot's position is then what the spool holds (walposition.py)
                    "--synchronous",
                    "--status-interval",
                    str(STATUS_INTERVAL_SECONDS),
                ]
            ),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._started_at = time.monotonic()
        self._errors = []
        self._stderr_reader = threading.Thread(
            target=self._log_stderr, args=(self._proc, self._errors), daemon=True
        )
        self._stderr_reader.start()
        log.info("wal %s: streaming into %s (slot %s)", self.target.name, self.spool, slot)
        return True

    def _complete_cut_short_partials(self) -> None:
        """A pg_receivewal killed while it made a new segment leaves a `.partial` shorter than a segment,
        which every later pg_receivewal refuses ("should be 0 or 16777216"): the stream would stay down.
        It writes a new segment's zeros in full before any WAL, so a short one holds no WAL yet: it is
        padded with zeros to a segment's size, and pg_receivewal resumes into it."""
        partials = [p for p in self._spool_segments() if p.name.endswith(PARTIAL) and p.stat().st_size]
        if not partials:
            return
        size = self._positions.segment_size()
        for path in partials:
            if (cut := path.stat().st_size) < size:
                log.warning(
                    "wal %s: %s was cut short at %d bytes (its pg_receivewal was killed); padded to %d",
                    self.target.name,
                    path.name,
                    cut,
                    size,
                )
                os.truncate(path, size)

    def _follow_server_timeline(self) -> None:
        """After a promote: set aside spool WAL the server's history abandoned, and resume at the fork.

        pg_receivewal resumes from the newest segment in its folder, on that segment's timeline; WAL of
        an abandoned branch makes it fail after every start, and a `.partial` holding the fork would be
        rewritten up to the fork, losing the branch's tail from the archive. Everything is uploaded
        first; the set-aside files stay in `abandoned/` for an operator.
        """
        server = server_timeline(Path(self.target.pg_bin), self.conninfo, self.env, self.target.name)
        if server.timeline == 1:
            return
        size = self._positions.segment_size()
        ended = {s.timeline: s.lsn for s in server.switches}
        segments = {p: Segment.parse(p.name.removesuffix(PARTIAL), size) for p in self._spool_segments()}
        abandoned = [
            path
            for path, segment in segments.items()
            if segment.timeline != server.timeline
            and not (segment.timeline in ended and (segment.segno + 1) * size <= ended[segment.timeline])
        ]
        if not abandoned:
            return
        self.upload_ready()
        aside = self.spool / ABANDONED
        aside.mkdir(exist_ok=True)
        for path in abandoned:
            if path.exists():
                os.replace(path, aside / path.name)
        fork = Segment.of(server.timeline, server.switches[-1].lsn, size)
        if not any(s.timeline == server.timeline for p, s in segments.items() if p not in abandoned):
            # An empty segment of the new timeline at the fork: pg_receivewal starts there, from its start.
            with (self.spool / (fork.name(size) + PARTIAL)).open("wb") as f:
                f.truncate(size)
        log.warning(
            "wal %s: the server is on timeline %d, forked at %s; set aside %s in %s, resuming at %s",
            self.target.name,
            server.timeline,
            format_lsn(server.switches[-1].lsn),
            ", ".join(sorted(p.name for p in abandoned)),
            aside,
            fork.name(size),
        )

    def _spool_segments(self) -> list[Path]:
        return [
            p
            for p in self.spool.iterdir()
            if p.is_file() and archivable(p.name) and SEGMENT_RE.match(p.name.removesuffix(PARTIAL))
        ]

    def _log_stderr(self, proc: subprocess.Popen[bytes], errors: list[str]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            log.warning("wal %s: %s", self.target.name, line)
            if line.startswith(RECEIVER_ERROR):
                errors.append(line.removeprefix(RECEIVER_ERROR))

    def _stop_receiver(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def upload_ready(self, covered_until: datetime | None = None) -> int:
        """Upload what arrived since the last call, each WAL segment with its commit index; returns how
        many files were uploaded. `covered_until`: every commit before it is in the spool (proven)."""
        uploaded = 0
        files = sorted(p for p in self.spool.iterdir() if p.is_file() and archivable(p.name))
        for path in files:
            if path.name.endswith(PARTIAL):
                uploaded += self._upload_partial(path, covered_until)
            else:
                uploaded += self._upload_complete(path, _following(path, files))
        return uploaded

    def _upload_complete(self, path: Path, following: Path | None) -> int:
        key = wal_key(self.target.name, path.name)
        uploaded = 0
        if path.name not in self._awaiting_index:
            if self.repo.exists(key) and not self._same_as_archived(path, key):
                # Two clusters writing one target's archive, or a damaged file: keep both for an operator.
                raise RuntimeError(
                    f"{key} is already archived with other contents; kept {path} for inspection"
                )
            stored = self.repo.put_stream(key, _file_chunks(path))
            log.info("wal %s: archived %s (%d bytes stored)", self.target.name, path.name, stored.stored_size)
            self._awaiting_index.add(path.name)
            uploaded = 1
        if SEGMENT_RE.match(path.name):
            index = self._index(path, following)
            if not index.complete:
                return uploaded  # its last record goes on in the next segment: indexed once that arrives
            # The partial's proof holds for the whole segment too.
            partial_index = self._partial_index.get(path.name + PARTIAL)
            if partial_index is not None:
                index = index.with_coverage(partial_index.covered_until)
            self.repo.put_json(index_key(self.target.name, path.name), index.to_json())
        # Its partial object, if any, is superseded by the complete segment.
        self.repo.delete(wal_key(self.target.name, path.name + PARTIAL))
        self.repo.delete(index_key(self.target.name, path.name + PARTIAL))
        self._partial_seen.pop(path.name + PARTIAL, None)
        self._partial_index.pop(path.name + PARTIAL, None)
        self._awaiting_index.discard(path.name)
        path.unlink()
        return uploaded

    def _upload_partial(self, path: Path, covered_until: datetime | None) -> int:
        """Index, then upload: the file only grows, so the object holds at least what its index lists."""
        known = self._partial_index.get(path.name)
        try:
            stat = path.stat()
            state = (stat.st_size, stat.st_mtime_ns)
            if self._partial_seen.get(path.name) == state and known is not None:
                if covered_until is not None:  # unchanged: only the proof moves on
                    self._put_partial_index(path.name, known.with_coverage(covered_until))
                return 0
            index = self._index(path, None).with_coverage(
                covered_until or (known.covered_until if known else None)
            )
            self.repo.put_stream(wal_key(self.target.name, path.name), _file_chunks(path))
        except FileNotFoundError:
            # pg_receivewal finished the segment and renamed it meanwhile: the next round uploads it whole.
            return 0
        self._partial_seen[path.name] = state
        self._put_partial_index(path.name, index)
        return 1

    def _put_partial_index(self, name: str, index: FileIndex) -> None:
        self.repo.put_json(index_key(self.target.name, name), index.to_json())
        self._partial_index[name] = index

    def _index(self, path: Path, following: Path | None) -> FileIndex:
        size = path.stat().st_size  # pg_receivewal writes segments, partial ones too, at full size
        segment = Segment.parse(path.name.removesuffix(PARTIAL), size)
        return index_file(Path(self.target.pg_bin), path, segment, size, following)

    def _same_as_archived(self, path: Path, key: str) -> bool:
        archived = hashlib.sha256()
        for chunk in self.repo.get_stream(key):
            archived.update(chunk)
        local = hashlib.sha256()
        for chunk in _file_chunks(path):
            local.update(chunk)
        return archived.digest() == local.digest()


def _following(path: Path, files: list[Path]) -> Path | None:
    """The spool file of the segment after `path`'s, complete or partial, if it is there."""
    if not SEGMENT_RE.match(path.name):
        return None  # a history file
    size = path.stat().st_size
    segment = Segment.parse(path.name, size)
    name = Segment(segment.timeline, segment.segno + 1).name(size)
    return next((p for p in files if p.name in (name, name + PARTIAL)), None)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(READ_SIZE):
            yield chunk
