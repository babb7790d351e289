"""Retention planning: which backups and archived WAL objects may be deleted, decided without any I/O.

The caller lists the repository, calls :func:`plan`, and then deletes ``expired_keys`` (or, for
``deskvault backups expire --dry-run``, prints :func:`describe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

FULL = "full"
DIFF = "diff"
PLAN_KEY = "(plan)"
NO_FULL_REASON = "no full backup: nothing is expired"


def _require_aware(value: datetime, what: str) -> None:
    # A naive datetime would compare against UTC ones by wall clock, shifting every age by the local offset.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {value!r}")


@dataclass(frozen=True)
class Backup:
    """One committed backup, as the repository's manifests describe it."""

    backup_id: str
    kind: str
    parent: str | None
    timeline: int
    start_segno: int
    stop_segno: int
    finished_at: datetime
    keys: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in (FULL, DIFF):
            raise ValueError(f"backup {self.backup_id}: kind must be 'full' or 'diff', not {self.kind!r}")
        if self.kind == FULL and self.parent is not None:
            raise ValueError(f"backup {self.backup_id}: a full backup has no parent, got {self.parent!r}")
        _require_aware(self.finished_at, f"backup {self.backup_id}: finished_at")


@dataclass(frozen=True)
class WalObject:
    """One archived WAL object; ``segno`` is None for timeline history files."""

    key: str
    timeline: int
    segno: int | None
    partial: bool


@dataclass(frozen=True)
class Policy:
    """How many fulls to keep and for how long; a full is kept if either rule keeps it."""

    full_count: int = 5
    full_max_age: timedelta = timedelta(days=35)

    def __post_init__(self) -> None:
        # bool is an int subclass; `full_count = true` in a config file is a mistake, not 1.
        if isinstance(self.full_count, bool) or not isinstance(self.full_count, int):
            raise TypeError(f"full_count must be an integer, not {self.full_count!r}")
        if self.full_count < 1:
            raise ValueError(f"full_count must be at least 1, not {self.full_count}")
        if not isinstance(self.full_max_age, timedelta):
            raise TypeError(f"full_max_age must be a timedelta, not {self.full_max_age!r}")
        if self.full_max_age < timedelta(0):
            raise ValueError(f"full_max_age must not be negative, not {self.full_max_age}")


@dataclass(frozen=True)
class Plan:
    """What to delete and why; ``reasons`` covers every backup and every expired WAL key."""

    kept_backups: tuple[str, ...]
    expired_backups: tuple[str, ...]
    expired_keys: tuple[str, ...]
    kept_from: tuple[int, int] | None
    reasons: dict[str, str]
    kinds: dict[str, str] = field(default_factory=dict)
    deleted_objects: dict[str, int] = field(default_factory=dict)
    expired_wal: tuple[str, ...] = ()


def _span(age: timedelta) -> str:
    if age % timedelta(days=1) == timedelta(0):
        days = age // timedelta(days=1)
        return f"{days} day" if days == 1 else f"{days} days"
    return str(age)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _index(backups: Sequence[Backup]) -> dict[str, Backup]:
    by_id: dict[str, Backup] = {}
    for backup in backups:
        if backup.backup_id in by_id:
            raise ValueError(f"backup id {backup.backup_id} appears twice")
        by_id[backup.backup_id] = backup
    return by_id


def _judge_fulls(fulls: list[Backup], policy: Policy, now: datetime) -> dict[str, str | None]:
    """Full id -> why it is kept, or None if it expires; ``fulls`` is oldest first."""
    newest = {b.backup_id for b in fulls[-policy.full_count :]}
    verdicts: dict[str, str | None] = {}
    for full in fulls:
        age = now - full.finished_at
        if full is fulls[-1]:
            verdicts[full.backup_id] = "the newest full"
        elif age < timedelta(0):
            # Clock skew or a bad manifest: deleting is irreversible, so doubt keeps the backup.
            verdicts[full.backup_id] = "finished after now"
        elif full.backup_id in newest:
            verdicts[full.backup_id] = f"among the newest {policy.full_count} fulls"
        elif age <= policy.full_max_age:
            verdicts[full.backup_id] = f"finished within {_span(policy.full_max_age)}"
        else:
            verdicts[full.backup_id] = None
    return verdicts


def _judge_diff(diff: Backup, by_id: dict[str, Backup], verdicts: dict[str, str | None]) -> tuple[bool, str]:
    if diff.parent is None:
        return False, "orphan, it names no full"
    parent = by_id.get(diff.parent)
    if parent is None:
        return False, f"orphan, its full {diff.parent} is not in the repository"
    if parent.kind != FULL:
        return False, f"orphan, its parent {diff.parent} is not a full"
    if verdicts[parent.backup_id] is None:
        return False, f"its full {parent.backup_id} expired"
    return True, f"its full {parent.backup_id} is kept"


def plan(backups: Sequence[Backup], wal: Sequence[WalObject], policy: Policy, now: datetime) -> Plan:
    """Decide which backups and WAL objects may be deleted at ``now``; pure and deterministic."""
    _require_aware(now, "now")
    by_id = _index(backups)
    kinds = {b.backup_id: b.kind for b in backups}
    # Tie-break on the id so that equal finish times still give one order, and so one answer.
    fulls = sorted((b for b in backups if b.kind == FULL), key=lambda b: (b.finished_at, b.backup_id))
    if not fulls:
        # Without a full nothing can be restored, but deleting would not fix that: leave it to a human.
        return Plan(
            kept_backups=tuple(sorted(by_id)),
            expired_backups=(),
            expired_keys=(),
            kept_from=None,
            reasons={PLAN_KEY: NO_FULL_REASON},
            kinds=kinds,
        )

    verdicts = _judge_fulls(fulls, policy, now)
    reasons: dict[str, str] = {}
    kept: list[Backup] = []
    expired: list[Backup] = []
    age_rule = f"older than {_span(policy.full_max_age)} and not among the newest {policy.full_count} fulls"
    for full in fulls:
        why = verdicts[full.backup_id]
        (kept if why else expired).append(full)
        reasons[full.backup_id] = f"full {full.backup_id}: {why or age_rule}"
    for diff in (b for b in backups if b.kind == DIFF):
        keep, why = _judge_diff(diff, by_id, verdicts)
        (kept if keep else expired).append(diff)
        reasons[diff.backup_id] = f"diff {diff.backup_id}: {why}"

    # The WAL floor is the lowest start of any kept backup. In a well-formed chain that is the oldest kept
    # full's start; taking the minimum also covers a newer full that started before an older one finished.
    anchor = min(kept, key=lambda b: (b.timeline, b.start_segno, b.finished_at, b.backup_id))
    kept_from = (anchor.timeline, anchor.start_segno)
    # Simplification: (timeline, segno) compare lexicographically, so every segment of a later timeline
    # counts as "after" the floor, without reading the history files to follow the actual branch. That
    # keeps too much rather than too little: segments of a later timeline are never expired, and a lower
    # timeline's segments past its switch point are only expired when no kept backup lies on that timeline.
    expired_wal: set[str] = set()
    for obj in wal:
        if obj.segno is None or (obj.timeline, obj.segno) >= kept_from:
            continue  # history files are tiny and restore needs them to follow a timeline switch
        expired_wal.add(obj.key)
        reasons[obj.key] = (
            f"WAL {obj.key}: before the start of {anchor.kind} {anchor.backup_id}, the oldest kept base "
            f"(timeline {anchor.timeline}, segment 0x{anchor.start_segno:X})"
        )

    # An object a kept backup lists is never deleted, even if an expired backup lists it too.
    protected = {key for b in kept for key in b.keys}
    deleted_objects = {b.backup_id: len(set(b.keys) - protected) for b in expired}
    doomed = {key for b in expired for key in b.keys} | expired_wal
    return Plan(
        kept_backups=tuple(sorted(b.backup_id for b in kept)),
        expired_backups=tuple(sorted(b.backup_id for b in expired)),
        expired_keys=tuple(sorted(doomed - protected)),
        kept_from=kept_from,
        reasons=reasons,
        kinds=kinds,
        deleted_objects=deleted_objects,
        expired_wal=tuple(sorted(expired_wal - protected)),
    )


def describe(plan: Plan) -> list[str]:
    """Human lines for ``deskvault backups expire --dry-run``."""
    lines = []
    if PLAN_KEY in plan.reasons:
        lines.append(plan.reasons[PLAN_KEY])
    for backup_id in plan.expired_backups:
        kind = plan.kinds.get(backup_id, "backup")
        objects = _plural(plan.deleted_objects.get(backup_id, 0), "object")
        # Reasons read "<kind> <id>: <why>"; the line already names the backup.
        why = plan.reasons.get(backup_id, "").split(": ", 1)[-1]
        lines.append(f"would delete {kind} {backup_id} ({objects}): {why}")
    fulls = sum(1 for b in plan.kept_backups if plan.kinds.get(b) == FULL)
    diffs = sum(1 for b in plan.kept_backups if plan.kinds.get(b) == DIFF)
    kept = f"keeps {_plural(fulls, 'full')}, {_plural(diffs, 'diff')}"
    if plan.kept_from is None:
        lines.append(f"{kept}, all WAL")
        return lines
    timeline, segno = plan.kept_from
    if plan.expired_wal:
        lines.append(
            f"would delete {_plural(len(plan.expired_wal), 'WAL object')} "
            f"before timeline {timeline} segment 0x{segno:X}"
        )
    lines.append(f"{kept}, WAL from timeline {timeline} segment 0x{segno:X}")
    return lines
