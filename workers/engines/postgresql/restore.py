"""Point-in-time restore: choose what a moment needs, refuse what cannot be reached, lay it out.

A restore to T needs the newest full backup finished at or before T and every WAL segment from that
backup's start up to the one holding T, without a gap. All of it is checked against the catalog before
anything is downloaded. The WAL is then downloaded (in parallel, while the base unpacks and, with
`start`, while PostgreSQL replays) next to the data directory, and the recovery settings point
PostgreSQL at it through a small shell script (see `walfetch`), because the server's own user runs
that command and need not be able to run deskvault.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deskvault_core.errors import DeskvaultError
from workers.engines.base import Relocated, RestoreResult, Unreachable, Window
from workers.engines.postgresql.basebackup import restore_full
from workers.engines.postgresql.cluster import (
    DEFAULT_PG_BIN,
    ClusterError,
    PgCluster,
    check_port_free,
    free_port,
    hand_over,
    log_report,
)
from workers.engines.postgresql.diff import apply_diff
from workers.engines.postgresql.tablespaces import Tablespace
from workers.engines.postgresql.tablespaces import layout as tablespace_layout
from workers.engines.postgresql.walarchive import WalArchive, WalEntry, list_wal, read_histories
from workers.engines.postgresql.walfetch import DOWNLOAD_THREADS, WalDownloads, local_name, restore_command
from workers.engines.postgresql.walnames import DEFAULT_SEGMENT_SIZE, Segment, parse_lsn
from workers.engines.progress import ByteProgress
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

# S3 upload times have one-second resolution: a partial segment is trusted up to a second before it.
UPLOAD_TIME_MARGIN = timedelta(seconds=1)
WAL_BESIDE_BASE = DOWNLOAD_THREADS  # WAL files downloaded while the base unpacks
WAL_FILE_RE = re.compile(r"[0-9A-F]{24}")
RECOVERY_SETTING_RE = re.compile(
    r"\s*(restore_command|recovery_target\w*|recovery_end_command|primary_conninfo|primary_slot_name)\s*="
)
COMMIT_RE = re.compile(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


@dataclass(frozen=True)
class RestorePlan:
    target: str
    at: datetime | None
    base: dict[str, Any]
    diff: dict[str, Any] | None  # the newest differential of `base` at or before `at`
    wal: tuple[WalEntry, ...]
    segment_size: int
    window: Window
    skipped: tuple[str, ...] = ()  # damaged manifests planned around: "key: why"
    # Upload times only bound what a segment holds (a re-upload makes a segment look newer), so the
    # rest of the archived run is fetched too if the planned WAL turns out to end before `at`.
    more_wal: tuple[WalEntry, ...] = ()
    gap: Segment | None = None
    # The timeline to follow the backup's onto (the newest descending from it; None: the backup's own),
    # and every archived history file, so a promote picks a timeline ID no one has used.
    follow_timeline: int | None = None
    history: tuple[WalEntry, ...] = ()

    @property
    def log_files(self) -> int:
        return len(self.wal)


def plan_restore(repo: ObjectRepository, target: str, at: datetime | None) -> RestorePlan:
    """What restoring `target` to `at` (None: the latest moment) needs; Unreachable says why not."""
    manifests, damaged = catalog.scan_manifests(repo, target)
    fulls = [m for m in manifests if m["kind"] == "full"]
    if not fulls:
        raise Unreachable(f"target {target} has no full backup yet; nothing can be restored")
    segment_size = fulls[-1].get("wal_segment_size") or DEFAULT_SEGMENT_SIZE
    entries = list_wal(repo, target, segment_size)
    archive = WalArchive(target, entries, segment_size, read_histories(repo, entries))
    window = Window(_finished(fulls[0]), _latest(fulls[-1], archive), _intervals(fulls, archive))
    if at is not None:
        at = at.astimezone(UTC)
        if at < window.earliest:
            raise Unreachable(
                f"{_show(at)} is before the oldest full backup of {target} finished "
                f"({_show(window.earliest)}); the restorable window is {_show_window(window)}"
            )
    base = [m for m in fulls if at is None or _finished(m) <= at][-1]
    diffs = [
        m
        for m in manifests
        if m["kind"] == "diff" and m["parent"] == base["backup_id"] and (at is None or _finished(m) <= at)
    ]
    diff = diffs[-1] if diffs else None
    # Replay starts at the checkpoint of the newest backup used, so the WAL is needed from there.
    run, gap = _contiguous_run(diff or base, archive)
    wal = _needed(run, at)
    if at is not None and (wal is None or at > window.latest):
        if gap is not None:
            raise Unreachable(
                f"{_show(at)} lies across a gap in the WAL archive of {target}: segment "
                f"{gap.name(segment_size)} is missing; the restorable window is {_show_window(window)}"
            )
        raise Unreachable(
            f"{_show(at)} is after the newest archived WAL of {target}; the restorable window is "
            f"{_show_window(window)}"
        )
    skipped = tuple(f"{key}: {why}" for key, why in damaged.items())
    wal = wal or run
    return RestorePlan(
        target,
        at,
        base,
        diff,
        tuple(wal),
        segment_size,
        window,
        skipped,
        more_wal=tuple(run[len(wal) :]),
        gap=gap,
        follow_timeline=_follow_timeline(archive, diff or base),
        history=tuple(e for e in entries if e.segment is None),
    )


def _follow_timeline(archive: WalArchive, start: dict[str, Any]) -> int | None:
    newest = archive.path(start["timeline"])[-1][0]
    return newest if newest != start["timeline"] else None


def _intervals(fulls: list[dict[str, Any]], archive: WalArchive) -> tuple[tuple[datetime, datetime], ...]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted((_finished(f), _latest(f, archive)) for f in fulls):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def _show_intervals(window: Window) -> str:
    return ", ".join(f"{_show(a)} .. {_show(b)}" for a, b in window.intervals)


def _finished(manifest: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(manifest["finished_at"])


def _contiguous_run(start: dict[str, Any], archive: WalArchive) -> tuple[list[WalEntry], Segment | None]:
    """The archived WAL from the backup's start with no hole, following its timeline's descendants onto
    the newest, and the first missing segment after it."""
    by_segment = {(e.segment, e.partial): e for e in archive.entries if e.segment is not None}
    timelines = {t for t, _ in archive.path(start["timeline"])}
    segno = parse_lsn(start["start_lsn"]) // archive.segment_size
    run: list[WalEntry] = []
    while True:
        segment = Segment(archive.timeline_at(start["timeline"], segno), segno)
        if (complete := by_segment.get((segment, False))) is not None:
            run.append(complete)
        elif (partial := by_segment.get((segment, True))) is not None:
            run.append(partial)
            return run, None  # the segment being written: nothing can follow it yet
        else:
            later = [
                e
                for e in archive.entries
                if e.segment is not None and e.segment.timeline in timelines and e.segment.segno > segno
            ]
            return run, segment if later else None
        segno += 1


def _needed(run: list[WalEntry], at: datetime | None) -> list[WalEntry] | None:
    """The run up to the first file uploaded after `at` (it holds `at`); None if the run ends earlier."""
    if at is None:
        return run
    for i, entry in enumerate(run):
        if entry.uploaded_at - UPLOAD_TIME_MARGIN >= at:
            return run[: i + 1]
    return None


def _latest(newest_full: dict[str, Any], archive: WalArchive) -> datetime:
    run, _ = _contiguous_run(newest_full, archive)
    if not run:
        return _finished(newest_full)
    return max(_finished(newest_full), run[-1].uploaded_at - UPLOAD_TIME_MARGIN)


def _show(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show_window(window: Window) -> str:
    return _show_intervals(window) or f"{_show(window.earliest)} .. {_show(window.latest)}"


def restore(
    repo: ObjectRepository,
    plan: RestorePlan,
    into: Path,
    *,
    start: bool = False,
    port: int = 0,
    pg_bin: Path | None = None,
    tablespaces: Mapping[str, Path] | None = None,
    on_progress: Callable[[str], None] = log.info,
) -> RestoreResult:
    """Lay out the base, the WAL and the recovery settings; with `start`, recover and report the time.

    With `start`, PostgreSQL starts as soon as the base is in place and replays the WAL while the rest
    of it downloads; without, every file is in place before this returns. `tablespaces` maps a
    tablespace (by oid, name or original location) to its new folder; the rest go beside `into`.
    """
    into = into.absolute()  # restore_command and the tablespace links must not depend on our cwd
    if start:
        # Port 0: a free one. Checked before anything is written or downloaded, since a busy port would
        # only fail the start, once the whole base is in.
        port = port or free_port()
        check_port_free(port)
    wal_dir = into.parent / f"{into.name}.wal"
    spaces = tablespace_layout([plan.base, plan.diff], into, tablespaces)
    for folder in (into, wal_dir, *(s.into for s in spaces)):
        # Checked before anything is written: on failure below, these folders are removed whole.
        if folder.exists() and any(folder.iterdir()):
            raise DeskvaultError(f"{folder} is not empty; restore into a new or empty folder")
    pg_bin = pg_bin or DEFAULT_PG_BIN
    downloads = WalDownloads(repo, wal_dir, on_progress, planned=len(plan.wal))
    cluster = None
    try:
        target = _lay_out(repo, plan, into, spaces, downloads, pg_bin, on_progress)
        if start:
            cluster = PgCluster(into, port, pg_bin)
            on_progress("starting PostgreSQL: it replays the WAL as the files arrive")
            cluster.start(timeout=600)
        downloads.wait_all()
        downloads.close()
        hand_over(wal_dir)
    except BaseException:
        downloads.abandon()
        if cluster is not None:
            cluster.stop("immediate")
        # Never leave a half-restored folder that someone might start.
        for folder in (into, wal_dir, *(s.into for s in spaces)):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # Every file is in place now: a recovery that fails from here on is left for inspection.
    reached = _recovered(cluster) if cluster is not None else None
    if cluster is not None:
        shutil.rmtree(wal_dir, ignore_errors=True)  # promoted: the server reads no more WAL
    relocated = tuple(Relocated(s.describe(), s.into) for s in spaces)
    return RestoreResult(into, wal_dir, target, reached, relocated, port if start else None)


def _lay_out(
    repo: ObjectRepository,
    plan: RestorePlan,
    into: Path,
    spaces: list[Tablespace],
    downloads: WalDownloads,
    pg_bin: Path,
    on_progress: Callable[[str], None],
) -> datetime | None:
    """Base, differential and recovery settings, WAL downloading meanwhile; returns the target time set."""
    downloads.add(plan.history)  # PostgreSQL reads them first, to choose its timelines
    wal = list(plan.wal)
    if plan.at is not None and wal:
        # Whether PostgreSQL gets a target time depends on the last commit in the last file: fetch it first.
        downloads.add(wal[-1:])
        wal = wal[:-1]
    # Only the first files download beside the base, which needs both cores; the rest follow it, while
    # PostgreSQL replays what is already there.
    downloads.add(wal[:WAL_BESIDE_BASE])
    on_progress(f"restoring base backup {plan.base['backup_id']}")
    restore_full(repo, plan.base, into, spaces=spaces, on_progress=ByteProgress("base", on_progress))
    for space in spaces:
        on_progress(f"{space.describe()} goes to {space.into}")
    if plan.diff is not None:
        on_progress(f"applying differential backup {plan.diff['backup_id']}")
        apply_diff(repo, plan.diff, into, spaces)
    downloads.add(wal[WAL_BESIDE_BASE:])
    target = _recovery_target(plan, downloads, pg_bin)
    _write_recovery_settings(into, downloads.wal_dir, target, plan.follow_timeline)
    hand_over(downloads.wal_dir)
    hand_over(into)
    return target


def _recovery_target(plan: RestorePlan, downloads: WalDownloads, pg_bin: Path) -> datetime | None:
    """The recovery_target_time to set: `plan.at`, or None where recovering to the end gives that state."""
    target = plan.at
    if target is None or not plan.wal:
        return target
    last_file = local_name(plan.wal[-1])
    downloads.wait_for(last_file)
    last = last_commit_time(downloads.wal_dir, pg_bin, [last_file])
    if last is None:
        downloads.wait_all()
        last = last_commit_time(downloads.wal_dir, pg_bin)
    if last is None or last <= target:
        if plan.more_wal:
            downloads.add(plan.more_wal)
            downloads.wait_all()
            last = last_commit_time(downloads.wal_dir, pg_bin)
        elif plan.gap is not None:
            raise Unreachable(
                f"{_show(target)} lies across a gap in the WAL archive of {plan.target}: segment "
                f"{plan.gap.name(plan.segment_size)} is missing and the WAL before it ends earlier"
            )
    if last is not None and target >= last:
        # No commit after T is archived: recovering to the end gives exactly the state at T, whereas
        # PostgreSQL refuses a target time it never sees passed.
        return None
    return target


def last_commit_time(wal_dir: Path, pg_bin: Path, names: list[str] | None = None) -> datetime | None:
    """The newest commit timestamp in the WAL files `names` (default: all in the folder), newest first."""
    if names is None:
        names = [p.name for p in wal_dir.iterdir() if WAL_FILE_RE.fullmatch(p.name)]
    for name in sorted(names, reverse=True):
        proc = subprocess.run(
            [str(pg_bin / "pg_waldump"), "--path", str(wal_dir), name], capture_output=True, text=True
        )
        stamps = COMMIT_RE.findall(proc.stdout)
        if stamps:
            return datetime.fromisoformat(stamps[-1]).replace(tzinfo=UTC)
    return None


def _write_recovery_settings(
    into: Path, wal_dir: Path, target: datetime | None, timeline: int | None
) -> None:
    """`timeline`: the one to follow the backup's timeline onto; None stays on the backup's own."""
    lines = [
        "# Written by deskvault restore",
        f"restore_command = '{restore_command(wal_dir)}'",
        f"recovery_target_timeline = '{timeline or 'current'}'",
    ]
    if target is not None:
        lines += [f"recovery_target_time = '{target.isoformat()}'", "recovery_target_action = 'promote'"]
    auto_conf = into / "postgresql.auto.conf"
    # A backup of a cluster that was itself restored carries that restore's settings (its target time
    # above all), dormant there without recovery.signal; here they would stop recovery at that moment.
    kept = [
        line
        for line in (auto_conf.read_text().splitlines() if auto_conf.exists() else [])
        if not RECOVERY_SETTING_RE.match(line)
    ]
    auto_conf.write_text("\n".join(kept + lines) + "\n")
    (into / "recovery.signal").touch()


def _recovered(cluster: PgCluster) -> datetime | None:
    """`_wait_recovered`, failing with the end of the server's log: psql failing here most likely means
    the server died replaying (a FATAL), which only the log explains."""
    try:
        return _wait_recovered(cluster)
    except DeskvaultError as e:
        raise ClusterError(
            f"recovery in {cluster.datadir} failed (left for inspection): {e}\n{log_report(cluster.log_file)}"
        ) from e


def _wait_recovered(cluster: PgCluster, timeout: float = 6 * 3600) -> datetime | None:
    deadline = time.monotonic() + timeout
    while cluster.psql("SELECT pg_is_in_recovery()").strip() == "t":
        if time.monotonic() > deadline:
            raise DeskvaultError(
                f"recovery did not finish within {timeout:.0f}s; the cluster is left running in "
                f"{cluster.datadir}, see its server log"
            )
        time.sleep(0.5)
    reached = cluster.psql("SELECT pg_last_xact_replay_timestamp()").strip()
    return datetime.fromisoformat(reached).astimezone(UTC) if reached else None
