"""The outcome of one readiness check (`deskvault check`): OK, WARN or FAIL, and what to do about it.

Exit codes follow Nagios: 0 every check OK, 1 a WARN, 2 a FAIL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
EXIT_CODES = {OK: 0, WARN: 1, FAIL: 2}


@dataclass(frozen=True)
class Check:
    what: str  # "broker", "target main: wal_level"
    level: str
    detail: str
    fix: str = ""  # for a WARN or FAIL: the command or change that clears it

    def line(self) -> str:
        fix = f"; {self.fix}" if self.fix and self.level != OK else ""
        return f"{self.level:<4}  {self.what}: {self.detail}{fix}"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def exit_code(checks: Iterable[Check]) -> int:
    return max((EXIT_CODES[c.level] for c in checks), default=0)
