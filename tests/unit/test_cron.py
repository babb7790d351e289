"""Cron expressions: parsing, the Vixie day rule, and firing-time search checked against brute force."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deskvault_core.cron import Cron, CronError
from deskvault_core.errors import DeskvaultError

FULL = "0 1 * * 0"
DIFF = "0 */2 * * *"
LOG = "0 * * * *"
SNAPSHOT = "0 3 * * *"


def utc(*parts: int) -> datetime:
    """A UTC datetime from year, month, day[, hour, minute, second, microsecond]."""
    return datetime(*parts, tzinfo=UTC)


# --- the schedules deskvault ships with -------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "at", "latest", "following"),
    [
        # full backup, Sundays 01:00 (2024-06-09 and 2024-06-16 are Sundays)
        (FULL, utc(2024, 6, 12, 10), utc(2024, 6, 9, 1), utc(2024, 6, 16, 1)),
        (FULL, utc(2024, 6, 9, 1), utc(2024, 6, 9, 1), utc(2024, 6, 16, 1)),
        (FULL, utc(2024, 6, 9, 0, 59, 59, 999_999), utc(2024, 6, 2, 1), utc(2024, 6, 9, 1)),
        (FULL, utc(2024, 6, 9, 1, 0, 30), utc(2024, 6, 9, 1), utc(2024, 6, 16, 1)),
        # differential, every two hours
        (DIFF, utc(2024, 6, 12, 13, 59), utc(2024, 6, 12, 12), utc(2024, 6, 12, 14)),
        (DIFF, utc(2024, 6, 12, 14), utc(2024, 6, 12, 14), utc(2024, 6, 12, 16)),
        (DIFF, utc(2024, 12, 31, 23, 30), utc(2024, 12, 31, 22), utc(2025, 1, 1, 0)),
        (DIFF, utc(2025, 1, 1, 0, 0, 0, 1), utc(2025, 1, 1, 0), utc(2025, 1, 1, 2)),
        # log backup, hourly
        (LOG, utc(2024, 6, 12, 10, 0, 0, 1), utc(2024, 6, 12, 10), utc(2024, 6, 12, 11)),
        (LOG, utc(2024, 6, 12, 10, 59, 59), utc(2024, 6, 12, 10), utc(2024, 6, 12, 11)),
        (LOG, utc(2024, 6, 12, 23), utc(2024, 6, 12, 23), utc(2024, 6, 13, 0)),
        # snapshot, daily 03:00
        (SNAPSHOT, utc(2024, 6, 12, 2, 59), utc(2024, 6, 11, 3), utc(2024, 6, 12, 3)),
        (SNAPSHOT, utc(2024, 6, 12, 3), utc(2024, 6, 12, 3), utc(2024, 6, 13, 3)),
        (SNAPSHOT, utc(2024, 3, 1, 0), utc(2024, 2, 29, 3), utc(2024, 3, 1, 3)),
    ],
)
def test_default_schedules_around_boundaries(
    expr: str, at: datetime, latest: datetime, following: datetime
) -> None:
    # Given one of deskvault's default schedules
    cron = Cron.parse(expr)
    # When searching either side of `at`
    # Then a firing time exactly at `at` counts as at-or-before, and "next" is strictly later
    assert cron.latest_at_or_before(at) == latest
    assert cron.next_after(at) == following


def test_results_are_utc_on_the_minute_even_for_other_zones() -> None:
    # Given 05:30 at +05:30, which is midnight UTC
    at = datetime(2024, 6, 12, 5, 30, 17, 5, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    cron = Cron.parse(SNAPSHOT)
    # When searching
    latest, following = cron.latest_at_or_before(at), cron.next_after(at)
    # Then the answers are computed and returned in UTC, with no seconds
    assert latest == utc(2024, 6, 11, 3) and latest.tzinfo is UTC
    assert following == utc(2024, 6, 12, 3) and following.tzinfo is UTC
    assert (latest.second, latest.microsecond) == (0, 0)


@pytest.mark.parametrize("method", ["matches", "latest_at_or_before", "next_after"])
def test_naive_datetimes_are_refused(method: str) -> None:
    # Given a datetime without a zone
    cron = Cron.parse(LOG)
    # When / Then any query refuses it
    with pytest.raises(ValueError, match="timezone-aware"):
        getattr(cron, method)(datetime(2024, 6, 12, 10))


def test_matches_ignores_seconds() -> None:
    # Given the hourly schedule
    cron = Cron.parse(LOG)
    # Then any instant inside minute :00 matches, and the minute after does not
    assert cron.matches(utc(2024, 6, 12, 10, 0, 59, 999_999))
    assert not cron.matches(utc(2024, 6, 12, 10, 1))


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "attr", "values"),
    [
        ("*/15 * * * *", "minutes", {0, 15, 30, 45}),
        ("10-20/5 * * * *", "minutes", {10, 15, 20}),
        ("50/3 * * * *", "minutes", {50, 53, 56, 59}),
        ("1,2,5-7 * * * *", "minutes", {1, 2, 5, 6, 7}),
        ("0 9-17 * * *", "hours", set(range(9, 18))),
        ("0 0 */10 * *", "days", {1, 11, 21, 31}),
        ("0 0 * JAN,mar-May *", "months", {1, 3, 4, 5}),
        ("0 0 * */3 *", "months", {1, 4, 7, 10}),
        ("0 0 * * mon-FRI", "weekdays", {1, 2, 3, 4, 5}),
        ("0 0 * * 7", "weekdays", {0}),
        ("0 0 * * 5-7", "weekdays", {5, 6, 0}),
        ("0 0 * * Sat,sun", "weekdays", {6, 0}),
        ("0 0 * * */2", "weekdays", {0, 2, 4, 6}),
        ("0 0 * * 1/2", "weekdays", {1, 3, 5}),
        ("0 0 * * *", "weekdays", set(range(7))),
    ],
)
def test_fields_parse_to_value_sets(expr: str, attr: str, values: set[int]) -> None:
    # Given an expression using steps, ranges, lists or names
    # When parsed
    # Then the field holds exactly the selected values (Sunday as 0, never 7)
    assert getattr(Cron.parse(expr), attr) == values


def test_parse_keeps_the_original_text_and_tolerates_spacing() -> None:
    # Given an expression with extra whitespace
    text = "  0\t3  * * *  "
    # When parsed
    cron = Cron.parse(text)
    # Then the text is kept verbatim and the fields are read normally
    assert cron.text == text
    assert (cron.minutes, cron.hours) == ({0}, {3})


@pytest.mark.parametrize(
    ("macro", "expanded"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macros_mean_their_five_field_form(macro: str, expanded: str) -> None:
    # Given a macro and the expression it stands for
    cron, plain = Cron.parse(macro), Cron.parse(expanded)
    # Then both select the same times, and the macro keeps its own text
    assert cron.text == macro
    assert {k: v for k, v in vars(cron).items() if k != "text"} == {
        k: v for k, v in vars(plain).items() if k != "text"
    }


def test_weekly_and_monthly_macros_fire_when_expected() -> None:
    # Given 2024-06-12, a Wednesday
    at = utc(2024, 6, 12, 12)
    # Then @weekly means Sunday midnight and @monthly the 1st at midnight
    assert Cron.parse("@weekly").next_after(at) == utc(2024, 6, 16)
    assert Cron.parse("@monthly").latest_at_or_before(at) == utc(2024, 6, 1)
    assert Cron.parse("@yearly").next_after(at) == utc(2025, 1, 1)


# --- the day-of-month / day-of-week rule -------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "day", "fires"),
    [
        # both restricted: the 13th OR any Friday (2024-06-13 Thu, 06-14 Fri, 06-12 Wed)
        ("0 0 13 * 5", utc(2024, 6, 13), True),
        ("0 0 13 * 5", utc(2024, 6, 14), True),
        ("0 0 13 * 5", utc(2024, 6, 12), False),
        # only one restricted: that one alone decides
        ("0 0 13 * *", utc(2024, 6, 13), True),
        ("0 0 13 * *", utc(2024, 6, 14), False),
        ("0 0 * * 5", utc(2024, 6, 14), True),
        ("0 0 * * 5", utc(2024, 6, 13), False),
        # a field starting with `*` counts as unrestricted, as in Vixie cron, so both must match:
        # odd day AND Monday (2024-06-03 Mon odd, 06-10 Mon even, 06-05 Wed odd)
        ("0 0 */2 * 1", utc(2024, 6, 3), True),
        ("0 0 */2 * 1", utc(2024, 6, 10), False),
        ("0 0 */2 * 1", utc(2024, 6, 5), False),
        # the month still has to match under the OR rule
        ("0 0 13 7 5", utc(2024, 6, 14), False),
    ],
)
def test_day_of_month_and_day_of_week_rule(expr: str, day: datetime, fires: bool) -> None:
    # Given an expression restricting days one way or both
    # When asked about midnight on `day`
    # Then it follows the Vixie rule
    assert Cron.parse(expr).matches(day) is fires


def test_or_rule_drives_the_search() -> None:
    # Given "the 13th or a Friday" and Wednesday 2024-06-12
    cron = Cron.parse("0 0 13 * 5")
    # Then the next firing is Thursday the 13th, then Friday the 14th
    assert cron.next_after(utc(2024, 6, 12)) == utc(2024, 6, 13)
    assert cron.next_after(utc(2024, 6, 13)) == utc(2024, 6, 14)


# --- month ends and leap days ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "at", "latest", "following"),
    [
        # the 31st skips short months both ways
        ("0 0 31 * *", utc(2024, 4, 15), utc(2024, 3, 31), utc(2024, 5, 31)),
        ("0 12 31 * *", utc(2024, 3, 15), utc(2024, 1, 31, 12), utc(2024, 3, 31, 12)),
        ("0 0 30 * *", utc(2024, 3, 1), utc(2024, 1, 30), utc(2024, 3, 30)),
        # the last minute of the year
        ("59 23 31 12 *", utc(2024, 12, 31, 23, 59), utc(2024, 12, 31, 23, 59), utc(2025, 12, 31, 23, 59)),
        # Feb 29 only exists in leap years, and 2100 is not one
        ("0 0 29 2 *", utc(2023, 3, 1), utc(2020, 2, 29), utc(2024, 2, 29)),
        ("0 0 29 2 *", utc(2024, 2, 29), utc(2024, 2, 29), utc(2028, 2, 29)),
        ("0 0 29 2 *", utc(2104, 2, 28, 23, 59), utc(2096, 2, 29), utc(2104, 2, 29)),
        ("0 0 29 2 *", utc(2096, 2, 29), utc(2096, 2, 29), utc(2104, 2, 29)),
        # Feb 29 on a Sunday (`*/7` is unrestricted, so AND): a 40-year gap across 2100
        ("0 0 29 2 */7", utc(2100, 1, 1), utc(2088, 2, 29), utc(2128, 2, 29)),
    ],
)
def test_month_ends_and_leap_days(expr: str, at: datetime, latest: datetime, following: datetime) -> None:
    # Given an expression tied to the end of a month or to Feb 29
    cron = Cron.parse(expr)
    # Then the search lands on the right day however far away it is
    assert cron.latest_at_or_before(at) == latest
    assert cron.next_after(at) == following


def test_yearly_search_skips_whole_days() -> None:
    # Given a leap-day schedule whose previous firing is eight years back
    cron = Cron.parse("0 0 29 2 *")
    # When searched many times (stepping by minute would take seconds per call)
    started = time.perf_counter()
    for _ in range(20):
        cron.latest_at_or_before(utc(2104, 2, 28, 23, 59))
        cron.next_after(utc(2096, 2, 29))
    # Then it stays well inside a second
    assert time.perf_counter() - started < 1.0


def test_search_is_bounded_when_nothing_can_fire() -> None:
    # Given a day set that no month has, built directly so parse() cannot refuse it
    cron = Cron(
        text="0 0 31 2 *",
        minutes=frozenset({0}),
        hours=frozenset({0}),
        days=frozenset({31}),
        months=frozenset({2}),
        weekdays=frozenset(range(7)),
        days_restricted=True,
        weekdays_restricted=False,
    )
    # When / Then both searches give up with a CronError instead of looping
    with pytest.raises(CronError, match="never fires after"):
        cron.next_after(utc(2024, 1, 1))
    with pytest.raises(CronError, match="never fired at or before"):
        cron.latest_at_or_before(utc(2024, 1, 1))


def test_search_stops_at_the_ends_of_the_calendar() -> None:
    # Given a daily 01:00 schedule
    cron = Cron.parse("0 1 * * *")
    # Then there is nothing after the last minute of 9999 nor before 01:00 on 0001-01-01
    with pytest.raises(CronError):
        cron.next_after(utc(9999, 12, 31, 23, 59))
    with pytest.raises(CronError):
        cron.latest_at_or_before(utc(1, 1, 1, 0, 30))
    assert cron.latest_at_or_before(utc(1, 1, 1, 1)) == utc(1, 1, 1, 1)
    assert cron.next_after(utc(9999, 12, 31)) == utc(9999, 12, 31, 1)


# --- errors ------------------------------------------------------------------------------------


def test_error_message_names_expression_field_and_problem() -> None:
    # Given an hour past 23
    # When parsed
    with pytest.raises(CronError) as caught:
        Cron.parse("0 25 * * *")
    # Then the message says which expression, which field and what is wrong
    assert str(caught.value) == "cron '0 25 * * *': hour: 25 is out of range 0-23"
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, DeskvaultError)


@pytest.mark.parametrize(
    ("expr", "field", "problem"),
    [
        ("60 * * * *", "minute", "60 is out of range 0-59"),
        ("0 24 * * *", "hour", "24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month", "0 is out of range 1-31"),
        ("0 0 32 * *", "day-of-month", "32 is out of range 1-31"),
        ("0 0 * 0 *", "month", "0 is out of range 1-12"),
        ("0 0 * 13 *", "month", "13 is out of range 1-12"),
        ("0 0 * * 8", "day-of-week", "8 is out of range 0-7"),
        ("99999999999 * * * *", "minute", "out of range 0-59"),
        ("*/0 * * * *", "minute", "step 0 in '*/0' is out of range 1-60"),
        ("0 1-5/0 * * *", "hour", "step 0"),
        ("*/61 * * * *", "minute", "step 61"),
        ("0 0 * * */8", "day-of-week", "step 8"),
        ("*/ * * * *", "minute", "missing step"),
        ("*/2/3 * * * *", "minute", "not a number"),
        ("*/-1 * * * *", "minute", "not a number"),
        ("0 5-2 * * *", "hour", "range '5-2' is reversed"),
        ("0 0 * DEC-JAN *", "month", "reversed"),
        ("0 0 * * SAT-SUN", "day-of-week", "reversed"),
        ("0 0 * * 7/2", "day-of-week", "past the last value 6"),
        ("1,,2 * * * *", "minute", "empty item"),
        ("1, * * * *", "minute", "empty item"),
        ("0 ,3 * * *", "hour", "empty item"),
        ("-1 * * * *", "minute", "missing value"),
        ("5- * * * *", "minute", "missing value"),
        ("1-2-3 * * * *", "minute", "not a number"),
        ("x * * * *", "minute", "'x' in 'x' is not a number"),
        ("1.5 * * * *", "minute", "not a number"),
        ("٣ * * * *", "minute", "not a number"),
        ("0 0 * JANUARY *", "month", "not a number or month name"),
        ("0 0 * MON *", "month", "not a number or month name"),
        ("0 0 * * FOO", "day-of-week", "not a number or day name"),
        ("0 0 * * \u017fun", "day-of-week", "not a number or day name"),  # long s upper-cases to S
        ("0 0 JAN * *", "day-of-month", "not a number"),
        ("0 0 31 2 *", "day-of-month", "31 never occurs in month 2"),
        ("0 0 30,31 FEB *", "day-of-month", "never occurs"),
        ("0 0 31 4,6,9,11 *", "day-of-month", "never occurs"),
    ],
)
def test_every_invalid_field_is_named(expr: str, field: str, problem: str) -> None:
    # Given an expression with one bad field
    # When parsed
    with pytest.raises(CronError) as caught:
        Cron.parse(expr)
    # Then the message starts with the expression and the field, and says what is wrong
    message = str(caught.value)
    assert message.startswith(f"cron '{expr}': {field}: "), message
    assert problem in message


@pytest.mark.parametrize("expr", ["", "   ", "* * * *", "* * * * * *", "0 0 * * * 2024"])
def test_wrong_field_count_lists_the_fields(expr: str) -> None:
    # Given too few or too many fields
    with pytest.raises(CronError) as caught:
        Cron.parse(expr)
    # Then the message names all five fields
    assert "expected 5 fields (minute hour day-of-month month day-of-week)" in str(caught.value)


@pytest.mark.parametrize("expr", ["@reboot", "@every 5m", "@"])
def test_unknown_macros_are_refused(expr: str) -> None:
    with pytest.raises(CronError, match="unknown macro"):
        Cron.parse(expr)


def test_nearly_impossible_expressions_are_accepted() -> None:
    # Given expressions that fire rarely but do fire
    # Then parsing accepts them (Feb 29 exists; OR-rule days always exist)
    Cron.parse("0 0 29 2 *")
    Cron.parse("0 0 31 2 1")
    Cron.parse("0 0 30,31 2,3 *")


# --- property: the search agrees with a brute-force reference ----------------------------------


@dataclass(frozen=True)
class Spec:
    """A generated expression and the value sets it must mean, worked out independently."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool


MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
LONGEST_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@st.composite
def items(draw, lo: int, hi: int, span_hi: int, names: tuple[str, ...] = (), first: int = 0):
    """One list item as (text, values)."""

    def token(value: int) -> str:
        if names and 0 <= value - first < len(names) and draw(st.booleans()):
            name = names[value - first]
            return draw(st.sampled_from([name, name.lower(), name.title()]))
        return str(value)

    kind = draw(st.sampled_from(["star", "star-step", "value", "range", "range-step", "start-step"]))
    width = span_hi - lo + 1
    step = draw(st.integers(1, width))
    if kind == "star":
        return "*", set(range(lo, span_hi + 1))
    if kind == "star-step":
        return f"*/{step}", set(range(lo, span_hi + 1, step))
    if kind == "start-step":
        start = draw(st.integers(lo, span_hi))
        return f"{start}/{step}", set(range(start, span_hi + 1, step))
    a = draw(st.integers(lo, hi))
    if kind == "value":
        return token(a), {a}
    b = draw(st.integers(a, hi))
    if kind == "range":
        return f"{token(a)}-{token(b)}", set(range(a, b + 1))
    return f"{token(a)}-{token(b)}/{step}", set(range(a, b + 1, step))


@st.composite
def fields(draw, *bounds, **named):
    """A comma list of one to three items as (text, values)."""
    chosen = draw(st.lists(items(*bounds, **named), min_size=1, max_size=3))
    return ",".join(text for text, _ in chosen), frozenset().union(*(values for _, values in chosen))


# `*` is drawn often for the rarer fields so most examples fire inside the brute-force window.
STAR_DAYS = st.just(("*", frozenset(range(1, 32))))
STAR_MONTHS = st.just(("*", frozenset(range(1, 13))))
STAR_WEEKDAYS = st.just(("*", frozenset(range(7))))


@st.composite
def specs(draw) -> Spec:
    """A random expression from a small grammar, with its meaning."""
    minute = draw(fields(0, 59, 59))
    hour = draw(fields(0, 23, 23))
    dom = draw(st.one_of(STAR_DAYS, fields(1, 31, 31)))
    month = draw(st.one_of(STAR_MONTHS, STAR_MONTHS, fields(1, 12, 12, names=MONTH_NAMES, first=1)))
    dow = draw(st.one_of(STAR_WEEKDAYS, fields(0, 7, 6, names=DAY_NAMES, first=0)))
    spec = Spec(
        text=" ".join(part for part, _ in (minute, hour, dom, month, dow)),
        minutes=minute[1],
        hours=hour[1],
        days=dom[1],
        months=month[1],
        weekdays=frozenset(d % 7 for d in dow[1]),
        days_restricted=not dom[0].startswith("*"),
        weekdays_restricted=not dow[0].startswith("*"),
    )
    # Expressions that can never fire are refused by parse(); their refusal is tested above.
    either = spec.days_restricted and spec.weekdays_restricted
    assume(either or any(d <= LONGEST_MONTH[m] for m in spec.months for d in spec.days))
    return spec


def reference_fires(spec: Spec, t: datetime) -> bool:
    """Whether `spec` fires at UTC minute `t`, by direct reading of the cron rules."""
    dom, dow = t.day in spec.days, t.isoweekday() % 7 in spec.weekdays
    day_ok = (dom or dow) if spec.days_restricted and spec.weekdays_restricted else (dom and dow)
    return t.minute in spec.minutes and t.hour in spec.hours and t.month in spec.months and day_ok


WINDOW = 3 * 24 * 60  # minutes the reference walks; answers beyond it are checked by bounds only
STEP = timedelta(minutes=1)


def reference_walk(spec: Spec, start: datetime, step: timedelta) -> datetime | None:
    """The first firing minute among WINDOW minutes from `start` on, walking by `step`."""
    for i in range(WINDOW):
        t = start + i * step
        if reference_fires(spec, t):
            return t
    return None


ZONES = [
    UTC,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-8)),
    timezone(timedelta(hours=14)),
]
MOMENTS = st.datetimes(
    min_value=datetime(1999, 1, 1), max_value=datetime(2101, 12, 31), timezones=st.sampled_from(ZONES)
)


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(spec=specs(), at=MOMENTS)
def test_search_matches_brute_force(spec: Spec, at: datetime) -> None:
    # Given a random expression and a random moment in any zone
    cron = Cron.parse(spec.text)
    floor = at.astimezone(UTC).replace(second=0, microsecond=0)

    # When the reference walks minute by minute from that moment, backwards and forwards
    back = reference_walk(spec, floor, -STEP)
    ahead = reference_walk(spec, floor + STEP, STEP)
    latest, following = cron.latest_at_or_before(at), cron.next_after(at)

    # Then both searches agree with it, or lie beyond the window and still fire
    assert reference_fires(spec, latest) and reference_fires(spec, following)
    assert cron.matches(latest) and cron.matches(following)
    assert latest == back if back else latest <= floor - WINDOW * STEP
    assert following == ahead if ahead else following > floor + WINDOW * STEP
    assert latest.tzinfo is UTC and following.tzinfo is UTC
