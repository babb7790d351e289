"""Retention planning: worked examples, and properties proving that no kept restore point loses an object."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.backups.retention import Backup, Plan, Policy, WalObject, describe, plan

T0 = datetime(2026, 10, 4, 1, 0, tzinfo=UTC)  # a Sunday, 01:00 UTC: the default full slot


def backup_id(kind: str, at: datetime) -> str:
    return f"{at:%Y%m%dT%H%M%SZ}-{kind}"


def make_backup(
    kind: str, at: datetime, start: int, stop: int, parent: str | None = None, tl: int = 1
) -> Backup:
    bid = backup_id(kind, at)
    keys = (f"targets/t/backups/{bid}/base.tar.dv", f"targets/t/backups/{bid}/manifest.dv")
    return Backup(bid, kind, parent, tl, start, stop, at, keys)


def wal_name(tl: int, segno: int) -> str:
    # PostgreSQL's naming for 16 MiB segments: timeline, log id, segment within the log, 8 hex digits each.
    return f"{tl:08X}{segno // 0x100:08X}{segno % 0x100:08X}"


def segment(tl: int, segno: int, partial: bool = False) -> WalObject:
    name = wal_name(tl, segno) + (".partial" if partial else "")
    return WalObject(f"targets/t/wal/{name}", tl, segno, partial)


def history(tl: int) -> WalObject:
    return WalObject(f"targets/t/wal/{tl:08X}.history", tl, None, False)


def weekly_chain(n_fulls: int) -> tuple[list[Backup], list[WalObject]]:
    """Fulls every Sunday from T0, two diffs after each; full i starts at segment 16*i + 2."""
    backups = []
    for i in range(n_fulls):
        at = T0 + timedelta(weeks=i)
        full = make_backup("full", at, 16 * i + 2, 16 * i + 3)
        backups.append(full)
        for j in (1, 2):
            diff_at = at + timedelta(days=2 * j)
            backups.append(
                make_backup("diff", diff_at, 16 * i + 2 + 4 * j, 16 * i + 3 + 4 * j, full.backup_id)
            )
    wal = [segment(1, s) for s in range(2, 16 * n_fulls + 1)]
    return backups, wal


def ids(backups: list[Backup], kind: str | None = None) -> set[str]:
    return {b.backup_id for b in backups if kind is None or b.kind == kind}


# --- worked examples -------------------------------------------------------------------------------------


def test_default_policy_expires_the_two_oldest_fulls_their_diffs_and_older_wal() -> None:
    # Given 7 weekly fulls with 2 diffs each, the newest a day old, so the 2nd-oldest is 36 days old
    backups, wal = weekly_chain(7)
    now = T0 + timedelta(weeks=6, days=1)
    # When planning with the default policy (5 fulls, 35 days)
    result = plan(backups, wal, Policy(), now)
    # Then the 2 oldest fulls and their 4 diffs expire
    old = ids(backups[:6])
    assert set(result.expired_backups) == old
    assert set(result.kept_backups) == ids(backups) - old
    # And WAL before the 3rd-oldest full's start (segment 34 = 0x22) expires, nothing from it on
    third = backups[6]
    assert result.kept_from == (1, third.start_segno) == (1, 34)
    assert result.expired_wal == tuple(sorted(w.key for w in wal if w.segno < 34))
    assert len(result.expired_wal) == 32
    # And the keys to delete are exactly the expired backups' keys and that WAL, sorted
    expected = {k for b in backups[:6] for k in b.keys} | set(result.expired_wal)
    assert result.expired_keys == tuple(sorted(expected))
    assert result.kept_backups == tuple(sorted(result.kept_backups))
    assert result.expired_backups == tuple(sorted(result.expired_backups))
    # And every decision has a one-line reason
    first = backups[0].backup_id
    assert result.reasons[first] == f"full {first}: older than 35 days and not among the newest 5 fulls"
    assert result.reasons[backups[1].backup_id] == f"diff {backups[1].backup_id}: its full {first} expired"
    assert result.reasons[wal[0].key].startswith(
        f"WAL {wal[0].key}: before the start of full {third.backup_id}"
    )
    assert "segment 0x22" in result.reasons[wal[0].key]
    assert set(result.reasons) == ids(backups) | set(result.expired_wal)


def test_age_rule_keeps_a_sixth_full_finished_within_max_age() -> None:
    # Given the same chain, where the 2nd-oldest full is 36 days old and the oldest 43
    backups, wal = weekly_chain(7)
    now = T0 + timedelta(weeks=6, days=1)
    # When the policy keeps fulls for 40 days
    result = plan(backups, wal, Policy(full_max_age=timedelta(days=40)), now)
    # Then the 2nd-oldest full is kept by age, beyond the newest 5, and only the oldest expires
    second = backups[3].backup_id
    assert second in result.kept_backups
    assert result.reasons[second] == f"full {second}: finished within 40 days"
    assert set(result.expired_backups) == ids(backups[:3])
    assert result.kept_from == (1, 18)


def test_age_boundary_is_inclusive() -> None:
    # Given two fulls, the older exactly full_max_age old
    old = make_backup("full", T0, 1, 2)
    new = make_backup("full", T0 + timedelta(days=1), 3, 4)
    policy = Policy(full_count=1, full_max_age=timedelta(days=3))
    # Then it is kept at exactly 3 days and expired a microsecond later
    assert plan([old, new], [], policy, T0 + timedelta(days=3)).expired_backups == ()
    later = T0 + timedelta(days=3, microseconds=1)
    assert plan([old, new], [], policy, later).expired_backups == (old.backup_id,)


def test_newest_full_is_kept_even_when_everything_is_old() -> None:
    # Given 3 fulls, the newest a year old, and a policy of 1 full for no time at all
    backups, wal = weekly_chain(3)
    now = T0 + timedelta(days=400)
    # When planning
    result = plan(backups, wal, Policy(full_count=1, full_max_age=timedelta(0)), now)
    # Then the newest full and its diffs survive, and WAL from its start
    newest = backups[6]
    assert set(result.kept_backups) == ids(backups[6:])
    assert result.reasons[newest.backup_id] == f"full {newest.backup_id}: the newest full"
    assert result.kept_from == (1, newest.start_segno)


def test_full_finished_in_the_future_is_kept() -> None:
    # Given an old full and one whose manifest says it finished after now (clock skew)
    older = make_backup("full", T0, 1, 2)
    future = make_backup("full", T0 + timedelta(days=100), 3, 4)
    newest = make_backup("full", T0 + timedelta(days=200), 5, 6)
    now = T0 + timedelta(days=90)
    # When the policy would keep only the newest
    result = plan([older, future, newest], [], Policy(full_count=1, full_max_age=timedelta(days=1)), now)
    # Then both future fulls are kept
    assert result.expired_backups == (older.backup_id,)
    assert result.reasons[future.backup_id].endswith("finished after now")


def test_orphan_diffs_are_expired() -> None:
    # Given a kept full, a diff whose full is gone, a diff naming no full and a diff whose parent is a diff
    full = make_backup("full", T0, 10, 11)
    missing = make_backup("diff", T0 + timedelta(days=1), 12, 13, parent="20260101T010000Z-full")
    nameless = make_backup("diff", T0 + timedelta(days=2), 14, 15, parent=None)
    child = make_backup("diff", T0 + timedelta(days=3), 16, 17, parent=full.backup_id)
    grandchild = make_backup("diff", T0 + timedelta(days=4), 18, 19, parent=child.backup_id)
    # When planning
    result = plan([full, missing, nameless, child, grandchild], [], Policy(), T0 + timedelta(days=5))
    # Then the orphans expire, with reasons that say so, and the proper diff is kept
    assert set(result.expired_backups) == {missing.backup_id, nameless.backup_id, grandchild.backup_id}
    assert result.kept_backups == tuple(sorted((full.backup_id, child.backup_id)))
    assert "orphan" in result.reasons[missing.backup_id]
    assert "20260101T010000Z-full is not in the repository" in result.reasons[missing.backup_id]
    assert "orphan, it names no full" in result.reasons[nameless.backup_id]
    assert "not a full" in result.reasons[grandchild.backup_id]


def test_without_a_full_nothing_is_expired() -> None:
    # Given only orphan diffs and some WAL
    diffs = [make_backup("diff", T0 + timedelta(days=d), d, d + 1, parent="gone-full") for d in range(3)]
    wal = [segment(1, s) for s in range(5)]
    # When planning long after
    result = plan(diffs, wal, Policy(full_count=1, full_max_age=timedelta(0)), T0 + timedelta(days=999))
    # Then nothing is expired, and the plan says why
    assert result.expired_backups == result.expired_keys == result.expired_wal == ()
    assert result.kept_backups == tuple(sorted(ids(diffs)))
    assert result.kept_from is None
    assert result.reasons == {"(plan)": "no full backup: nothing is expired"}
    assert describe(result) == ["no full backup: nothing is expired", "keeps 0 fulls, 3 diffs, all WAL"]
    assert plan([], [], Policy(), T0).kept_from is None


def test_history_files_and_later_timelines_are_kept() -> None:
    # Given a promotion at segment 0x30: timeline 2 from there, timeline 1 up to its .partial plus what the
    # old primary archived past the switch point before it went away; and three fulls
    old = make_backup("full", T0, 0x10, 0x11)
    new = make_backup("full", T0 + timedelta(weeks=1), 0x20, 0x21)
    after = make_backup("full", T0 + timedelta(weeks=2), 0x34, 0x35, tl=2)
    wal = [segment(1, s) for s in range(0x10, 0x38)] + [segment(1, 0x30, partial=True)]
    wal += [segment(2, s) for s in range(0x30, 0x40)] + [history(2)]
    # When the oldest full expires
    result = plan(
        [old, new, after], wal, Policy(full_count=2, full_max_age=timedelta(0)), T0 + timedelta(weeks=3)
    )
    # Then WAL before the newer full's start expires; the .partial, timeline 2 and the history file stay
    assert result.expired_backups == (old.backup_id,)
    assert result.kept_from == (1, 0x20)
    assert set(result.expired_wal) == {w.key for w in wal if w.timeline == 1 and w.segno < 0x20}
    assert history(2).key not in result.expired_keys
    assert segment(1, 0x30, partial=True).key not in result.expired_keys

    # And once only the timeline-2 full is kept, timeline 1 (partial included) expires but not its history
    result = plan(
        [old, new, after], wal, Policy(full_count=1, full_max_age=timedelta(0)), T0 + timedelta(weeks=3)
    )
    assert result.kept_from == (2, 0x34)
    assert set(result.expired_wal) == {w.key for w in wal if w.timeline == 1} | {
        w.key for w in wal if w.timeline == 2 and w.segno is not None and w.segno < 0x34
    }
    assert history(2).key not in result.expired_keys
    assert "timeline 2, segment 0x34" in result.reasons[segment(1, 0x30, partial=True).key]


def test_wal_floor_covers_a_newer_full_that_started_first() -> None:
    # Given two overlapping fulls: the newer one started (segment 5) before the older one (segment 8) finished
    slow = make_backup("full", T0 + timedelta(hours=5), 5, 12)
    quick = make_backup("full", T0 + timedelta(hours=1), 8, 9)
    wal = [segment(1, s) for s in range(0, 13)]
    # When both are kept
    result = plan([slow, quick], wal, Policy(), T0 + timedelta(days=1))
    # Then WAL is kept from the lower start, so the newer full stays restorable
    assert result.kept_from == (1, 5)
    assert set(result.expired_wal) == {segment(1, s).key for s in range(5)}


def test_equal_finish_times_break_ties_by_id() -> None:
    # Given two fulls finished at the same instant
    a = Backup("a-full", "full", None, 1, 1, 2, T0, ("a",))
    b = Backup("b-full", "full", None, 1, 3, 4, T0, ("b",))
    # When keeping one, then the larger id counts as newer, whatever the input order
    policy = Policy(full_count=1, full_max_age=timedelta(0))
    for order in ([a, b], [b, a]):
        result = plan(order, [], policy, T0 + timedelta(days=1))
        assert result.kept_backups == ("b-full",)
        assert result.expired_keys == ("a",)


def test_a_key_listed_by_a_kept_backup_is_never_deleted() -> None:
    # Given an expired full that lists an object a kept full lists too
    old = Backup("old-full", "full", None, 1, 1, 2, T0, ("shared", "old"))
    new = Backup("new-full", "full", None, 1, 3, 4, T0 + timedelta(days=1), ("shared", "new"))
    result = plan([old, new], [], Policy(full_count=1, full_max_age=timedelta(0)), T0 + timedelta(days=2))
    # Then only the expired full's own object is deleted
    assert result.expired_backups == ("old-full",)
    assert result.expired_keys == ("old",)
    assert result.deleted_objects == {"old-full": 1}


def test_describe_reads_like_a_dry_run() -> None:
    backups, wal = weekly_chain(7)
    result = plan(backups, wal, Policy(), T0 + timedelta(weeks=6, days=1))
    lines = describe(result)
    first = backups[0].backup_id
    assert (
        lines[0]
        == f"would delete full {first} (2 objects): older than 35 days and not among the newest 5 fulls"
    )
    assert f"would delete diff {backups[1].backup_id} (2 objects): its full {first} expired" in lines
    assert lines[-2:] == [
        "would delete 32 WAL objects before timeline 1 segment 0x22",
        "keeps 5 fulls, 10 diffs, WAL from timeline 1 segment 0x22",
    ]
    assert len(lines) == 6 + 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"full_count": 0}, ValueError, "full_count must be at least 1"),
        ({"full_count": -3}, ValueError, "full_count must be at least 1"),
        ({"full_count": True}, TypeError, "full_count must be an integer"),
        ({"full_count": 2.0}, TypeError, "full_count must be an integer"),
        ({"full_max_age": timedelta(seconds=-1)}, ValueError, "full_max_age must not be negative"),
        ({"full_max_age": 35}, TypeError, "full_max_age must be a timedelta"),
    ],
)
def test_policy_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Policy(**kwargs)


def test_policy_defaults_and_zero_age_are_valid() -> None:
    assert Policy() == Policy(5, timedelta(days=35))
    assert Policy(full_count=1, full_max_age=timedelta(0)).full_max_age == timedelta(0)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be 'full' or 'diff'"):
        Backup("x", "log", None, 1, 1, 2, T0, ())
    with pytest.raises(ValueError, match="a full backup has no parent"):
        Backup("x", "full", "y", 1, 1, 2, T0, ())
    with pytest.raises(ValueError, match="finished_at must be timezone-aware"):
        Backup("x", "full", None, 1, 1, 2, datetime(2026, 1, 1), ())
    full = make_backup("full", T0, 1, 2)
    with pytest.raises(ValueError, match="appears twice"):
        plan([full, full], [], Policy(), T0)
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        plan([full], [], Policy(), datetime(2026, 1, 1))


# --- properties over random chains -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    backups: list[Backup]
    wal: list[WalObject]
    policy: Policy
    now: datetime
    fractions: list[float]  # restore points between the oldest kept full and now, as fractions of that span


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """1-12 fulls with 0-4 diffs each, segments increasing with time, now and then a promotion."""
    at = T0
    seg = draw(st.integers(0, 600))
    timeline = 1
    ranges: list[list[int]] = []  # per timeline: [first segno, last segno]
    backups: list[Backup] = []
    first_seg = seg

    def next_backup(kind: str, parent: str | None) -> Backup:
        nonlocal at, seg, timeline
        if backups and draw(st.sampled_from((False,) * 8 + (True,))):
            # Promotion: the old timeline's last segment is a .partial, the new one continues from there.
            seg += draw(st.integers(0, 2))
            ranges.append([seg, seg])
            timeline += 1
        at += timedelta(minutes=draw(st.integers(1, 20 * 24 * 60)))
        start = seg + draw(st.integers(0, 3))
        seg = start + draw(st.integers(0, 3))
        return make_backup(kind, at, start, seg, parent, timeline)

    ranges.append([first_seg, first_seg])
    for _ in range(draw(st.integers(1, 12))):
        full = next_backup("full", None)
        backups.append(full)
        for _ in range(draw(st.integers(0, 4))):
            backups.append(next_backup("diff", full.backup_id))

    end = seg + draw(st.integers(0, 5))
    wal: list[WalObject] = []
    # A few segments before the first full, as left over from backups deleted long ago.
    begin = max(0, first_seg - draw(st.integers(0, 3)))
    bounds = [begin] + [r[0] for r in ranges[1:]] + [end]
    for i in range(len(ranges)):
        tl = i + 1
        lo, hi = bounds[i], bounds[i + 1]
        last_is_partial = tl < len(ranges)
        wal += [segment(tl, s) for s in range(lo, hi if last_is_partial else hi + 1)]
        if last_is_partial:
            wal.append(segment(tl, hi, partial=True))
            # The old primary may have archived segments past the switch point before it went away.
            wal += [segment(tl, s) for s in range(hi + 1, hi + 1 + draw(st.integers(0, 4)))]
        if tl > 1:
            wal.append(history(tl))

    policy = Policy(draw(st.integers(1, 8)), timedelta(hours=draw(st.integers(0, 60 * 24))))
    span = backups[-1].finished_at - T0
    minutes = draw(st.integers(-5 * 24 * 60, int(span / timedelta(minutes=1)) + 80 * 24 * 60))
    now = T0 + timedelta(minutes=minutes)
    fractions = draw(st.lists(st.floats(0, 1), max_size=6))
    return Scenario(backups, wal, policy, now, fractions)


def order(b: Backup) -> tuple[datetime, str]:
    return (b.finished_at, b.backup_id)


def needed_at(t: datetime, backups: list[Backup], wal: list[WalObject]) -> set[str]:
    """What restoring to ``t`` reads: the newest full and diff by then, and WAL from the full on."""
    full = max((b for b in backups if b.kind == "full" and b.finished_at <= t), key=order)
    diffs = [b for b in backups if b.parent == full.backup_id and b.finished_at <= t]
    keys = set(full.keys) | (set(max(diffs, key=order).keys) if diffs else set())
    # Replay runs from the full's start along its timeline and any later one it was promoted to.
    for w in wal:
        if w.timeline < full.timeline:
            continue
        if (w.segno is None and w.timeline > full.timeline) or (
            w.segno is not None and w.segno >= full.start_segno
        ):
            keys.add(w.key)
    return keys


def oldest_kept_full(scenario: Scenario, result: Plan) -> Backup:
    return min(
        (b for b in scenario.backups if b.kind == "full" and b.backup_id in result.kept_backups), key=order
    )


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_every_kept_restore_point_keeps_what_it_needs(scenario: Scenario) -> None:
    # Given a random chain, policy and time; When planning
    result = plan(scenario.backups, scenario.wal, scenario.policy, scenario.now)
    expired = set(result.expired_keys)
    oldest = oldest_kept_full(scenario, result)
    # Then every restore point from the oldest kept full on still has every object it reads
    points = [b.finished_at for b in scenario.backups if b.finished_at >= oldest.finished_at]
    window = max(scenario.now - oldest.finished_at, timedelta(0))
    points += [oldest.finished_at + window * f for f in scenario.fractions]
    for t in points:
        missing = needed_at(t, scenario.backups, scenario.wal) & expired
        assert not missing, f"restore to {t} would miss {sorted(missing)[:3]}"


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_invariants(scenario: Scenario) -> None:
    result = plan(scenario.backups, scenario.wal, scenario.policy, scenario.now)
    every = ids(scenario.backups)
    # The newest full is never expired
    newest = max((b for b in scenario.backups if b.kind == "full"), key=order)
    assert newest.backup_id in result.kept_backups
    # Kept and expired split the backups exactly
    assert not set(result.kept_backups) & set(result.expired_backups)
    assert set(result.kept_backups) | set(result.expired_backups) == every
    assert len(result.kept_backups) + len(result.expired_backups) == len(every)
    # Rule 1 restated: a full is kept if among the newest full_count or at most full_max_age old
    fulls = sorted((b for b in scenario.backups if b.kind == "full"), key=order, reverse=True)
    for rank, full in enumerate(fulls):
        young = scenario.now - full.finished_at <= scenario.policy.full_max_age
        assert (full.backup_id in result.kept_backups) == (rank < scenario.policy.full_count or young)
    # Rule 2: a diff goes with its full
    for diff in (b for b in scenario.backups if b.kind == "diff"):
        assert (diff.backup_id in result.kept_backups) == (diff.parent in result.kept_backups)
    # Outputs are sorted and every expired thing has a reason
    for seq in (result.kept_backups, result.expired_backups, result.expired_keys, result.expired_wal):
        assert list(seq) == sorted(set(seq))
    assert every <= set(result.reasons)
    assert set(result.expired_wal) <= set(result.reasons)
    # No WAL at or after the oldest kept full's start is expired, and no history file at all
    oldest = oldest_kept_full(scenario, result)
    expired = set(result.expired_keys)
    for w in scenario.wal:
        if w.segno is None or (w.timeline, w.segno) >= (oldest.timeline, oldest.start_segno):
            assert w.key not in expired
        else:
            assert w.key in expired  # ...and everything strictly before it is
    # Same input, same output, whatever order the repository listed things in
    again = plan(scenario.backups[::-1], scenario.wal[::-1], scenario.policy, scenario.now)
    assert again == result


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_planning_again_expires_nothing_more(scenario: Scenario) -> None:
    # Given the plan carried out
    first = plan(scenario.backups, scenario.wal, scenario.policy, scenario.now)
    gone = set(first.expired_keys)
    backups = [b for b in scenario.backups if b.backup_id in first.kept_backups]
    wal = [w for w in scenario.wal if w.key not in gone]
    # When planning again at the same time
    second = plan(backups, wal, scenario.policy, scenario.now)
    # Then nothing more expires
    assert second.expired_backups == second.expired_keys == ()
    assert second.kept_backups == first.kept_backups
    assert second.kept_from == first.kept_from
