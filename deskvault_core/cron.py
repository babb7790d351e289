"""Five-field cron expressions for the backup scheduler, evaluated in UTC with Vixie-cron day rules."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from deskvault_core.errors import DeskvaultError


class CronError(DeskvaultError, ValueError):
    """A cron expression is invalid or never fires; the message names the expression and the field."""

    exit_code = 2


@dataclass(frozen=True)
class _Field:
    """How one of the five fields is read."""

    name: str
    lo: int
    hi: int
    # `*` and `a/n` stop here; day-of-week accepts 7 but stepping onto it would count Sunday twice.
    span_hi: int
    names: tuple[str, ...] = ()
    names_start: int = 0
    names_kind: str = ""


_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")

_MINUTE_F = _Field("minute", 0, 59, span_hi=59)
_HOUR_F = _Field("hour", 0, 23, span_hi=23)
_DOM_F = _Field("day-of-month", 1, 31, span_hi=31)
_MONTH_F = _Field("month", 1, 12, span_hi=12, names=_MONTH_NAMES, names_start=1, names_kind="month")
_DOW_F = _Field("day-of-week", 0, 7, span_hi=6, names=_DAY_NAMES, names_start=0, names_kind="day")
_FIELDS = (_MINUTE_F, _HOUR_F, _DOM_F, _MONTH_F, _DOW_F)

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

# Leap years count: a day-of-month is reachable in a month if some year has that many days in it.
_LONGEST_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# The Gregorian calendar, weekdays included, repeats every 400 years, so an expression that has not
# fired within that span never will. Real gaps are far shorter (at most 40 years, for "Feb 29 on a
# Sunday" across 2100), and the search stops at the first hit, so the bound costs nothing normally.
_HORIZON = timedelta(days=146_097)
_DAY = timedelta(days=1)
_MINUTE = timedelta(minutes=1)

_HourMinute = tuple[int, int]


class _FieldProblem(Exception):
    """What is wrong with one field; parse() adds the expression and the field name."""


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression; `text` is kept verbatim for messages."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    # Sunday is 0; a 7 in the expression is stored as 0.
    weekdays: frozenset[int]
    # Vixie cron: a day field is restricted unless it starts with `*`; when both are, either may match.
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        """Parse five fields (minute hour day-of-month month day-of-week) or an @macro."""
        stripped = text.strip()
        if stripped.startswith("@"):
            expanded = _MACROS.get(stripped.lower())
            if expanded is None:
                known = " ".join(_MACROS)
                raise CronError(f"cron '{text}': unknown macro '{stripped}' (known: {known})")
            stripped = expanded
        parts = stripped.split()
        if len(parts) != len(_FIELDS):
            names = " ".join(f.name for f in _FIELDS)
            raise CronError(f"cron '{text}': expected 5 fields ({names}), got {len(parts)}")
        sets = []
        for spec, part in zip(_FIELDS, parts, strict=True):
            try:
                sets.append(_parse_field(spec, part))
            except _FieldProblem as problem:
                raise CronError(f"cron '{text}': {spec.name}: {problem}") from None
        minutes, hours, days, months, weekdays = sets
        cron = cls(
            text=text,
            minutes=minutes,
            hours=hours,
            days=days,
            months=months,
            weekdays=frozenset(d % 7 for d in weekdays),
            days_restricted=not parts[2].startswith("*"),
            weekdays_restricted=not parts[4].startswith("*"),
        )
        cron._check_fires()
        return cron

    def matches(self, dt: datetime) -> bool:
        """Whether the expression fires in the minute containing `dt`."""
        at = _to_utc(dt)
        return at.minute in self.minutes and at.hour in self.hours and self._day_matches(at.date())

    def latest_at_or_before(self, dt: datetime) -> datetime:
        """The newest firing time not after `dt`, in UTC."""
        hours, minutes = sorted(self.hours), sorted(self.minutes)
        try:
            start = _to_utc(dt).replace(second=0, microsecond=0)
            day, limit = start.date(), _shift(start.date(), -_HORIZON)
            hour, minute = start.hour, start.minute
            while day >= limit:
                if day.month not in self.months:
                    # Whole months are skipped so yearly expressions cost a few dozen steps per year.
                    day = day.replace(day=1) - _DAY
                    hour, minute = 23, 59
                    continue
                if self._day_matches(day):
                    found = _last_at_or_before(hours, minutes, hour, minute)
                    if found is not None:
                        return datetime.combine(day, time(*found), UTC)
                day -= _DAY
                hour, minute = 23, 59
        except OverflowError:
            # Reaching below 0001-01-01 means there is nothing earlier to find.
            pass
        raise CronError(f"cron '{self.text}': never fired at or before {dt.isoformat()}")

    def next_after(self, dt: datetime) -> datetime:
        """The first firing time strictly after `dt`, in UTC."""
        hours, minutes = sorted(self.hours), sorted(self.minutes)
        try:
            start = _to_utc(dt).replace(second=0, microsecond=0) + _MINUTE
            day, limit = start.date(), _shift(start.date(), _HORIZON)
            hour, minute = start.hour, start.minute
            while day <= limit:
                if day.month not in self.months:
                    day = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
                    hour, minute = 0, 0
                    continue
                if self._day_matches(day):
                    found = _first_at_or_after(hours, minutes, hour, minute)
                    if found is not None:
                        return datetime.combine(day, time(*found), UTC)
                day += _DAY
                hour, minute = 0, 0
        except OverflowError:
            # Reaching past 9999-12-31 means there is nothing later to find.
            pass
        raise CronError(f"cron '{self.text}': never fires after {dt.isoformat()}")

    def _day_matches(self, day: date) -> bool:
        """Whether the expression fires on some minute of `day`."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def _check_fires(self) -> None:
        """Refuse expressions that can never fire, such as Feb 31."""
        # Either-match always fires, and every (month, day) pair that exists falls on each weekday in
        # some year, so only day-of-month against month can make an expression dead.
        if self.days_restricted and self.weekdays_restricted:
            return
        if any(d <= _LONGEST_MONTH[m] for m in self.months for d in self.days):
            return
        days = ",".join(map(str, sorted(self.days)))
        months = ",".join(map(str, sorted(self.months)))
        raise CronError(f"cron '{self.text}': day-of-month: {days} never occurs in month {months}")


def _parse_field(spec: _Field, text: str) -> frozenset[int]:
    """The values a comma list selects."""
    values: set[int] = set()
    for item in text.split(","):
        values.update(_parse_item(spec, item, text))
    return frozenset(values)


def _parse_item(spec: _Field, item: str, field_text: str) -> range:
    """The values one `*`, `a`, `a-b`, with optional `/n`, selects."""
    if not item:
        raise _FieldProblem(f"empty item in '{field_text}'")
    base, slash, step_text = item.partition("/")
    if base == "*":
        start, stop = spec.lo, spec.span_hi
    elif "-" in base:
        first, _, last = base.partition("-")
        start, stop = _value(spec, first, item), _value(spec, last, item)
        if start > stop:
            raise _FieldProblem(f"range '{item}' is reversed ({start} > {stop})")
    else:
        start = _value(spec, base, item)
        stop = spec.span_hi if slash else start
        if start > stop:
            raise _FieldProblem(f"'{item}' steps from {start}, past the last value {spec.span_hi}")
    if not slash:
        return range(start, stop + 1)
    if not step_text:
        raise _FieldProblem(f"missing step in '{item}'")
    if not _is_number(step_text):
        raise _FieldProblem(f"step '{step_text}' in '{item}' is not a number")
    width = spec.span_hi - spec.lo + 1
    step = int(step_text) if len(step_text) <= 9 else width + 1
    if not 1 <= step <= width:
        raise _FieldProblem(f"step {step_text} in '{item}' is out of range 1-{width}")
    return range(start, stop + 1, step)


def _value(spec: _Field, token: str, item: str) -> int:
    """One number or name, checked against the field's range."""
    if not token:
        raise _FieldProblem(f"missing value in '{item}'")
    if _is_number(token):
        # Huge literals would trip Python's int-parsing limit; they are out of range anyway.
        value = int(token) if len(token) <= 9 else spec.hi + 1
        if not spec.lo <= value <= spec.hi:
            raise _FieldProblem(f"{token} is out of range {spec.lo}-{spec.hi}")
        return value
    # isascii() keeps Unicode case folding (e.g. the long s, which upper-cases to S) out of names.
    if spec.names and token.isascii() and token.upper() in spec.names:
        return spec.names.index(token.upper()) + spec.names_start
    kind = f" or {spec.names_kind} name" if spec.names else ""
    raise _FieldProblem(f"'{token}' in '{item}' is not a number{kind}")


def _is_number(token: str) -> bool:
    """Whether `token` is made of ASCII digits only."""
    # str.isdigit() alone accepts non-ASCII digits such as '٣'.
    return token.isascii() and token.isdigit()


def _to_utc(dt: datetime) -> datetime:
    """`dt` in UTC; naive datetimes are refused because their zone would be a guess."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt.isoformat()}: cron times must be timezone-aware")
    return dt.astimezone(UTC)


def _shift(day: date, delta: timedelta) -> date:
    """`day + delta`, clamped to the calendar's ends."""
    # The horizon may reach past year 1 or 9999; clamping lets the search still cover the real dates.
    try:
        return day + delta
    except OverflowError:
        return date.max if delta > timedelta(0) else date.min


def _first_at_or_after(hours: list[int], minutes: list[int], hour: int, minute: int) -> _HourMinute | None:
    """The earliest (hour, minute) in the sorted lists at or after the given one."""
    i = bisect_left(hours, hour)
    if i < len(hours) and hours[i] == hour:
        j = bisect_left(minutes, minute)
        if j < len(minutes):
            return hour, minutes[j]
        i += 1
    if i < len(hours):
        return hours[i], minutes[0]
    return None


def _last_at_or_before(hours: list[int], minutes: list[int], hour: int, minute: int) -> _HourMinute | None:
    """The latest (hour, minute) in the sorted lists at or before the given one."""
    i = bisect_right(hours, hour) - 1
    if i >= 0 and hours[i] == hour:
        j = bisect_right(minutes, minute) - 1
        if j >= 0:
            return hour, minutes[j]
        i -= 1
    if i >= 0:
        return hours[i], minutes[-1]
    return None
