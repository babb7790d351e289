"""Point-in-time restore: choose what a moment needs, refuse what cannot be reached, lay it out.

A restore to T replays from the newest backup (a differential, or its full) finished at or before T whose
WAL from its start to its consistency point is archived, through every segment up to the one holding the
last commit at or before T (see `stops`), without a gap. All of it is checked against the catalog and
the commit indexes before anything is downloaded. The WAL is then downloaded (in parallel, while the
base unpacks and, with `start`, while PostgreSQL replays) next to the data directory, and the recovery
settings point PostgreSQL at it through a small shell script (see `walfetch`), because the server's own
user runs that command and need not be able to run deskvault.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deskvault_core.errors import DeskvaultError
from deskvault_core.progress import ByteProgress
from workers.engines.base import NoBackupYet, Relocated, RestoreGoal, RestoreResult, Unreachable, Window
from workers.engines.postgresql.basebackup import restore_full
from workers.engines.postgresql.cluster import (
    DEFAULT_PG_BIN,
    ClusterError,
    PgCluster,
    check_port_free,
    free_port,
    hand_over,
    log_report,
    server_user,
)
from workers.engines.postgresql.commitindex import Commit
from workers.engines.postgresql.diff import apply_diff
from workers.engines.postgresql.parts import default_parallel
from workers.engines.postgresql.stops import IndexReader, Stop, consistency_stop, file_of
from workers.engines.postgresql.subset import (
    ALONE_SETTINGS,
    DatabaseSubset,
    check_replayed,
    skipped_bytes,
    subset_for,
)
from workers.engines.postgresql.tablespaces import Tablespace
from workers.engines.postgresql.tablespaces import layout as tablespace_layout
from workers.engines.postgresql.walarchive import WalArchive, WalEntry, list_wal, read_histories
from workers.engines.postgresql.walfetch import (
    DOWNLOAD_THREADS,
    WAIT_FOR_FILE_SECONDS,
    WalDownloads,
    restore_command,
)
from workers.engines.postgresql.walnames import DEFAULT_SEGMENT_SIZE, Segment, format_lsn, parse_lsn
from workers.engines.postgresql.writeback import settle, written_back_meanwhile
from workers.repository import catalog
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

WAL_BESIDE_BASE = DOWNLOAD_THREADS  # WAL files downloaded while the base unpacks
SOURCE_HBA, SOURCE_IDENT = "pg_hba.conf.from-backup", "pg_ident.conf.from-backup"
CLOSED_HBA = f"""# Written by deskvault restore: local connections only, each local user as the role
# of its own name and root (deskvault) as postgres -- see pg_ident.conf; no TCP connection is
# accepted, whatever listen_addresses says. deskvault starts the server with its socket in a 0700 folder.
# The backed-up rules are in {SOURCE_HBA}: put them back to open this copy to its network
# deliberately (a copy that takes the source's place).
local all all peer map=deskvault
local replication all peer map=deskvault
"""
LSN_RE = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")
RECOVERY_SETTING_RE = re.compile(
    r"\s*(restore_command|recovery_target\w*|recovery_end_command|recovery_init_sync_method"
    r"|primary_conninfo|primary_slot_name)\s*="
)


@dataclass(frozen=True)
class RestorePlan:
    target: str
    at: datetime | None
    base: dict[str, Any]
    diff: dict[str, Any] | None  # the differential of `base` replay starts from, if any
    wal: tuple[WalEntry, ...]
    segment_size: int
    window: Window
    stop: Stop  # exactly where recovery stops, checked once it has
    skipped: tuple[str, ...] = ()  # damaged manifests and unusable backups planned around: "what: why"
    # The timeline to follow the backup's onto (the newest descending from it; None: the backup's own),
    # and every archived history file, so a promote picks a timeline ID no one has used.
    follow_timeline: int | None = None
    history: tuple[WalEntry, ...] = ()

    @property
    def log_files(self) -> int:
        return len(self.wal)


def plan_restore(
    repo: ObjectRepository,
    target: str,
    at: datetime | None = None,
    *,
    goal: RestoreGoal | None = None,
    pg_bin: Path | None = None,
) -> RestorePlan:
    """What restoring `target` to `at` (or `goal`; neither: the latest moment) needs, before anything
    is downloaded; Unreachable says why it cannot be reached."""
    goal = goal or RestoreGoal(at=at)
    lsn = _parse_lsn_goal(goal.lsn)
    manifests, damaged = catalog.scan_manifests(repo, target)
    fulls = [m for m in manifests if m["kind"] == "full"]
    if not fulls:
        raise NoBackupYet(f"target {target} has no full backup yet; nothing can be restored")
    archive, reader = _open_archive(repo, target, fulls, pg_bin)
    segment_size, entries = archive.segment_size, archive.entries
    runs: dict[str, tuple[list[WalEntry], Segment | None]] = {}

    def run_of(backup: dict[str, Any]) -> tuple[list[WalEntry], Segment | None]:
        if backup["backup_id"] not in runs:
            runs[backup["backup_id"]] = _contiguous_run(backup, archive)
        return runs[backup["backup_id"]]

    window = _window(fulls, run_of, reader, segment_size)
    moment = goal.at.astimezone(UTC) if goal.at is not None else None
    goal = RestoreGoal(moment, goal.xid, goal.lsn, goal.name)
    if moment is not None and moment < window.earliest:
        raise Unreachable(
            f"{_show(moment)} is before the oldest full backup of {target} finished "
            f"({_show(window.earliest)}); the restorable window is {_show_window(window)}"
        )
    skipped = [f"{key}: {why}" for key, why in damaged.items()]
    by_id = {m["backup_id"]: m for m in fulls}
    for start in _candidates(manifests, fulls, moment):
        run, _ = run_of(start)
        if not _consistent(run, start, reader, segment_size):
            skipped.append(
                f"backup {start['backup_id']}: the WAL from its start ({start['start_lsn']}) to its "
                f"consistency point ({start['stop_lsn']}) is not archived"
            )
            continue
        found = _resolve(goal, lsn, start, run, reader, segment_size)
        if found is None:
            continue
        stop, last = found
        full = start if start["kind"] == "full" else by_id[start["parent"]]
        return RestorePlan(
            target,
            moment,
            full,
            start if start["kind"] == "diff" else None,
            # the file after the stop's too: the record stopped after may end in it
            tuple(run[: last + 2]),
            segment_size,
            window,
            stop,
            tuple(skipped),
            follow_timeline=_follow_timeline(archive, start),
            history=tuple(e for e in entries if e.segment is None),
        )
    raise Unreachable(
        _unreachable(goal, target, window, [run_of(f)[1] for f in fulls], segment_size, skipped)
    )


def restorable_by_backup(repo: ObjectRepository, target: str, pg_bin: Path | None = None) -> dict[str, str]:
    """For each full and differential: the stretch a replay from it really reaches, or why it cannot."""
    manifests, _ = catalog.scan_manifests(repo, target)
    fulls = [m for m in manifests if m["kind"] == "full"]
    if not fulls:
        return {}
    archive, reader = _open_archive(repo, target, fulls, pg_bin)
    found = {}
    for backup in (m for m in manifests if m["kind"] in ("full", "diff")):
        run, _ = _contiguous_run(backup, archive)
        if not _consistent(run, backup, reader, archive.segment_size):
            found[backup["backup_id"]] = (
                f"not restorable: the WAL from {backup['start_lsn']} to its consistency point "
                f"{backup['stop_lsn']} is not archived"
            )
        else:
            finished = _finished(backup)
            found[backup["backup_id"]] = f"{_show(finished)} .. {_show(reader.coverage(run, finished))}"
    return found


def _open_archive(
    repo: ObjectRepository, target: str, fulls: list[dict[str, Any]], pg_bin: Path | None
) -> tuple[WalArchive, IndexReader]:
    segment_size = fulls[-1].get("wal_segment_size") or DEFAULT_SEGMENT_SIZE
    entries = list_wal(repo, target, segment_size)
    archive = WalArchive(target, entries, segment_size, read_histories(repo, entries))
    return archive, IndexReader(repo, target, pg_bin or DEFAULT_PG_BIN, segment_size)


def _parse_lsn_goal(text: str | None) -> int | None:
    if text is None:
        return None
    if not LSN_RE.fullmatch(text):
        raise Unreachable(f"--lsn {text!r} is not an LSN; write it as PostgreSQL does, e.g. 0/3000148")
    return parse_lsn(text)


def _candidates(
    manifests: list[dict[str, Any]], fulls: list[dict[str, Any]], at: datetime | None
) -> list[dict[str, Any]]:
    """Backups replay could start from, newest first: each full's differentials, then the full."""
    found = []
    for full in reversed(fulls):
        if at is not None and _finished(full) > at:
            continue
        diffs = [
            m
            for m in manifests
            if m["kind"] == "diff" and m["parent"] == full["backup_id"] and (at is None or _finished(m) <= at)
        ]
        found += [*reversed(diffs), full]
    return found


def _consistent(run: list[WalEntry], backup: dict[str, Any], reader: IndexReader, segment_size: int) -> bool:
    """Whether replay from the backup can become consistent: a full carries the WAL it needs in its tar
    (pg_basebackup -X fetch); a differential needs the archived WAL up to its consistency point."""
    if backup["kind"] == "full":
        return True
    stop_lsn = parse_lsn(backup["stop_lsn"])
    i = file_of(run, stop_lsn, segment_size)
    return i is not None and not (run[i].partial and reader.get(run, i).end_lsn < stop_lsn)


def _resolve(
    goal: RestoreGoal,
    lsn: int | None,
    start: dict[str, Any],
    run: list[WalEntry],
    reader: IndexReader,
    segment_size: int,
) -> tuple[Stop, int] | None:
    """Where replay from `start` stops for `goal`, and the position of that file in `run`; None if it
    cannot get there (before the backup's consistency point, or beyond its archived WAL)."""
    consistent_at = parse_lsn(start["stop_lsn"])
    consistency = (consistency_stop(start), file_of(run, consistent_at, segment_size) or 0)
    found: tuple[int, Commit] | None
    if goal.xid is not None:
        found = reader.find_commit(run, goal.xid)
        return None if found is None or found[1].lsn < consistent_at else _commit_stop(found)
    if goal.name is not None:
        found_point = reader.find_restore_point(run, goal.name)
        if found_point is None or found_point[1].lsn < consistent_at:
            return None
        i, point = found_point
        return Stop(point.lsn, f"restore point {goal.name!r} (LSN {format_lsn(point.lsn)})", point.end), i
    if lsn is not None:
        i = file_of(run, lsn, segment_size)
        if lsn < consistent_at or i is None or lsn >= reader.get(run, i).end_lsn:
            return None
        return Stop(lsn, f"LSN {format_lsn(lsn)}"), i
    if goal.at is None:
        found = next(
            ((i, c) for i in range(len(run) - 1, -1, -1) for c in reversed(reader.get(run, i).commits)), None
        )
    else:
        if goal.at > reader.coverage(run, _finished(start)):
            return None
        found = reader.last_commit_by(run, goal.at)
    if found is None or found[1].lsn < consistent_at:
        return consistency  # every commit up to the moment is in the backup itself
    return _commit_stop(found)


def _commit_stop(found: tuple[int, Commit]) -> tuple[Stop, int]:
    i, commit = found
    return Stop(commit.lsn, commit.describe(), commit.end, commit), i


def _unreachable(
    goal: RestoreGoal,
    target: str,
    window: Window,
    gaps: list[Segment | None],
    segment_size: int,
    skipped: list[str],
) -> str:
    if goal.xid is not None:
        return (
            f"transaction {goal.xid} has no commit in the archived WAL of {target} after a backup's "
            "consistency point: it aborted, has not committed yet, or committed outside the restorable "
            f"window ({_show_window(window)})"
        )
    if goal.name is not None:
        return (
            f"no restore point named {goal.name!r} is in the archived WAL of {target} after a backup's "
            f"consistency point; create one with: deskvault mark --target {target} NAME"
        )
    if goal.lsn is not None:
        return (
            f"LSN {goal.lsn} is not in the archived WAL of {target} after a backup's "
            f"consistency point; the restorable window is {_show_window(window)}"
        )
    if goal.at is None:
        return f"no backup of {target} can be restored: {'; '.join(skipped)}"
    gap = next((g for g in reversed(gaps) if g is not None), None)
    if gap is not None:
        return (
            f"{_show(goal.at)} lies across a gap in the WAL archive of {target}: segment "
            f"{gap.name(segment_size)} is missing; the restorable window is {_show_window(window)}"
        )
    return (
        f"{_show(goal.at)} is after the newest archived WAL of {target}; the restorable window is "
        f"{_show_window(window)}"
    )


def _follow_timeline(archive: WalArchive, start: dict[str, Any]) -> int | None:
    newest = archive.path(start["timeline"])[-1][0]
    return newest if newest != start["timeline"] else None


def _window(
    fulls: list[dict[str, Any]],
    run_of: Callable[[dict[str, Any]], tuple[list[WalEntry], Segment | None]],
    reader: IndexReader,
    segment_size: int,
) -> Window:
    """Each full's finish to the moment its archived WAL run holds every commit up to, merged."""
    stretches = []
    for full in fulls:
        run, _ = run_of(full)
        if _consistent(run, full, reader, segment_size):
            stretches.append((_finished(full), reader.coverage(run, _finished(full))))
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(stretches):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    latest = merged[-1][1] if merged else _finished(fulls[-1])
    return Window(_finished(fulls[0]), latest, tuple(merged))


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
    wal_patience: float = WAIT_FOR_FILE_SECONDS,
    database: str | None = None,
    throwaway: bool = False,
) -> RestoreResult:
    """Lay out the base, the WAL and the recovery settings; with `start`, recover, check that recovery
    reached the plan's stop, and report the last transaction replayed.

    With `start`, PostgreSQL starts as soon as the base is in place and replays the WAL while the rest
    of it downloads; without, every file is in place before this returns. `tablespaces` maps a
    tablespace (by oid, name or original location) to its new folder; the rest go beside `into`.
    With `database`, only that database's files (and those the server needs) are laid out where the
    backup allows it (see `subset`): a copy to dump that one database from, and nothing else; it needs
    `start`, since what replay met is checked once it has. With `throwaway` (a scratch copy, removed
    once read), nothing is written back or synced, and the server runs with fsync off: a crash of the
    host loses only a copy that would be made again.
    """
    if database is not None and not start:
        raise ValueError("a restore of one database is started here: its replay is checked once recovered")
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
    downloads = WalDownloads(repo, wal_dir, on_progress, planned=len(plan.wal), patience=wal_patience)
    cluster = None
    try:
        laid_out = [into, *(space.into for space in spaces)]
        with nullcontext() if throwaway else written_back_meanwhile(laid_out):
            subset = _lay_out(repo, plan, into, spaces, downloads, on_progress, database, throwaway)
        if not throwaway:
            # Durable before anything says restored, and out of the page cache before replay (see settle).
            settle(laid_out)
        if start:
            cluster = PgCluster(into, port, pg_bin)
            on_progress("starting PostgreSQL: it replays the WAL as the files arrive")
            cluster.start(timeout=600)
        downloads.wait_all()
        downloads.close()
        hand_over(wal_dir)
    except BaseException as e:
        missing = downloads.missing()  # read before the folder goes
        downloads.abandon()
        if cluster is not None:
            try:
                cluster.stop("immediate")
            except DeskvaultError as stop_error:
                # What failed the restore is the error to report; the stop is cleanup.
                log.warning("%s", stop_error)
        # Never leave a half-restored folder that someone might start.
        for folder in (into, wal_dir, *(s.into for s in spaces)):
            shutil.rmtree(folder, ignore_errors=True)
        if missing and isinstance(e, DeskvaultError):
            raise DeskvaultError(f"recovery stopped before {plan.stop.what}: {missing}") from e
        raise
    # Every file is in place now: a recovery that fails from here on is left for inspection.
    reached = None
    if cluster is not None:
        reached = _recovered(cluster, downloads.missing)
        _check_reached(cluster, plan.stop)
        if subset is not None:
            ignored = check_replayed(cluster.log_file, subset)
            on_progress(f"replay passed over {ignored} reference(s) to pages of the databases left out")
        if plan.stop.commit is not None:
            # PostgreSQL does not note the time of a commit it stops after by LSN; replay ended at it.
            reached = plan.stop.commit.at
        shutil.rmtree(wal_dir, ignore_errors=True)  # promoted: the server reads no more WAL
    relocated = tuple(Relocated(s.describe(), s.into) for s in spaces)
    socket_dir = cluster.socket_dir if cluster is not None else None
    return RestoreResult(
        into, wal_dir, plan.at, reached, relocated, plan.stop.what, port if start else None, socket_dir
    )


def _lay_out(
    repo: ObjectRepository,
    plan: RestorePlan,
    into: Path,
    spaces: list[Tablespace],
    downloads: WalDownloads,
    on_progress: Callable[[str], None],
    database: str | None,
    throwaway: bool,
) -> DatabaseSubset | None:
    """Base, differential and recovery settings, WAL downloading meanwhile; with `database`, that
    database alone where the backup allows it (the subset laid out)."""
    downloads.add(plan.history)  # PostgreSQL reads them first, to choose its timelines
    wal = list(plan.wal)
    # Only the first files download beside the base, which needs both cores; the rest follow it, while
    # PostgreSQL replays what is already there.
    downloads.add(wal[:WAL_BESIDE_BASE])
    subset = _subset(plan, database, on_progress)
    keeps = subset.keeps if subset is not None else None
    on_progress(f"restoring base backup {plan.base['backup_id']}")
    parallel = default_parallel()
    restore_full(
        repo,
        plan.base,
        into,
        spaces=spaces,
        parallel=parallel,
        on_progress=ByteProgress("base", on_progress),
        keeps=keeps,
    )
    for space in spaces:
        on_progress(f"{space.describe()} goes to {space.into}")
    if plan.diff is not None:
        on_progress(f"applying differential backup {plan.diff['backup_id']}")
        apply_diff(repo, plan.diff, into, spaces, parallel=parallel, keeps=keeps)
    downloads.add(wal[WAL_BESIDE_BASE:])
    extra = list(ALONE_SETTINGS) if subset is not None else []
    if throwaway:
        extra.append("fsync = off")  # no start-up sync of the data directory, no fsync at checkpoints
    _write_recovery_settings(into, downloads.wal_dir, plan.stop, plan.follow_timeline, extra)
    _close_access(into)
    hand_over(downloads.wal_dir)
    hand_over(into)
    return subset


def _subset(
    plan: RestorePlan, database: str | None, on_progress: Callable[[str], None]
) -> DatabaseSubset | None:
    if database is None:
        return None
    found = subset_for([plan.base, plan.diff], database)
    if isinstance(found, str):
        on_progress(f"laying out the whole cluster to restore database {database}: {found}")
        return None
    skipped = sum(skipped_bytes(b, found) for b in (plan.base, plan.diff) if b is not None)
    on_progress(
        f"restoring database {database} alone: {skipped / 2**20:.0f} MiB of other databases' parts skipped"
    )
    return found


def _close_access(into: Path) -> None:
    """Access rules of the restore's own: the backed-up ones were the source's, made for its network,
    and a restored copy holds every row of it. It is kept beside, for an operator to open deliberately."""
    for name, kept in (("pg_hba.conf", SOURCE_HBA), ("pg_ident.conf", SOURCE_IDENT)):
        if (into / name).exists():
            os.replace(into / name, into / kept)
    (into / "pg_hba.conf").write_text(CLOSED_HBA)
    us = pwd.getpwuid(os.geteuid()).pw_name
    superusers = sorted({us, server_user() or us})
    (into / "pg_ident.conf").write_text(
        "# Written by deskvault restore (see pg_hba.conf)\n"
        "deskvault /^(.*)$ \\1\n" + "".join(f"deskvault {name} postgres\n" for name in superusers)
    )


def _write_recovery_settings(
    into: Path, wal_dir: Path, stop: Stop, timeline: int | None, extra: list[str] | None = None
) -> None:
    """`timeline`: the one to follow the backup's timeline onto; None stays on the backup's own; `extra`:
    further settings of this copy's.

    PostgreSQL refuses to promote when it runs out of WAL before the stop: a missing file is a failed
    restore, never a quietly shorter one.
    """
    lines = [
        "# Written by deskvault restore",
        f"restore_command = '{restore_command(wal_dir)}'",
        f"recovery_target_timeline = '{timeline or 'current'}'",
        (
            "recovery_target = 'immediate'"
            if stop.consistent
            else f"recovery_target_lsn = '{stop.lsn_text}'\nrecovery_target_inclusive = on"
        ),
        "recovery_target_action = 'promote'",
        # The restore wrote every file without fsync: one syncfs per file system at start, instead of
        # PostgreSQL's fsync of each file.
        "recovery_init_sync_method = 'syncfs'",
        *(extra or []),
    ]
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


def _recovered(cluster: PgCluster, missing: Callable[[], str] = lambda: "") -> datetime | None:
    """`_wait_recovered`, failing with the end of the server's log: psql failing here most likely means
    the server died replaying (a FATAL), which only the log explains; `missing` names a WAL file that
    never came, the likeliest cause."""
    try:
        return _wait_recovered(cluster)
    except DeskvaultError as e:
        raise ClusterError(
            f"recovery in {cluster.datadir} failed (left for inspection): {missing() or e}\n"
            f"{log_report(cluster.log_file)}"
        ) from e


def _wait_recovered(cluster: PgCluster, timeout: float = 6 * 3600) -> datetime | None:
    deadline = time.monotonic() + timeout
    pause = 0.05
    while cluster.psql("SELECT pg_is_in_recovery()").strip() == "t":
        if time.monotonic() > deadline:
            raise DeskvaultError(
                f"recovery did not finish within {timeout:.0f}s; the cluster is left running in "
                f"{cluster.datadir}, see its server log"
            )
        # Often only a moment of WAL to replay: look again soon, then every half second.
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
    return _last_replayed_commit(cluster)


def _last_replayed_commit(cluster: PgCluster) -> datetime | None:
    reached = cluster.psql("SELECT pg_last_xact_replay_timestamp()").strip()
    return datetime.fromisoformat(reached).astimezone(UTC) if reached else None


def _check_reached(cluster: PgCluster, stop: Stop) -> None:
    """Replay ended exactly at the end of the record stopped after (past the LSN asked for; at least at
    the consistency point), not before it and not beyond."""
    replayed = parse_lsn(cluster.psql("SELECT pg_last_wal_replay_lsn()").strip())
    if stop.consistent:
        reached = replayed >= stop.lsn
    elif stop.end is not None:
        reached = replayed == stop.end
    else:
        reached = replayed > stop.lsn
    if not reached:
        raise DeskvaultError(
            f"recovery of {cluster.datadir} ended at LSN {format_lsn(replayed)}, not at the planned "
            f"{stop.what}; the cluster is left running for inspection, see its server log"
        )
