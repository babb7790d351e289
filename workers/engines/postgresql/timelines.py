"""Timelines: which WAL belongs to a target's history after a restored copy was promoted in its place.

Promoting a restored copy starts a new timeline that forks from its parent at a switch point; the
parent's WAL after that point belongs to an abandoned branch. A history file (`00000002.history`) lists
every ancestor timeline and where it ended. Two readers use it: the streamer, to set aside the spool's
abandoned WAL and resume at the fork on the server's timeline, and restore plans, to follow a backup's
WAL across the switch onto the newest timeline descending from it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from workers.engines.base import EngineError
from workers.engines.postgresql.walnames import parse_lsn


@dataclass(frozen=True)
class Switch:
    """Timeline `timeline` ended at `lsn`, where its child began."""

    timeline: int
    lsn: int


def parse_history(text: str) -> list[Switch]:
    """A history file's switches, oldest first (`<parent tli>\\t<switch lsn>\\t<reason>` per line)."""
    switches = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        switches.append(Switch(int(fields[0]), parse_lsn(fields[1])))
    return switches


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


@dataclass(frozen=True)
class ServerTimeline:
    timeline: int
    switches: list[Switch]  # its ancestors, oldest first; [] on timeline 1


def server_timeline(pg_bin: Path, conninfo: str, env: dict[str, str], target: str) -> ServerTimeline:
    """The server's timeline and history, over a replication connection (what pg_receivewal has)."""
    timeline = int(_replication_command(pg_bin, conninfo, env, "IDENTIFY_SYSTEM", target).split("|")[1])
    if timeline == 1:
        return ServerTimeline(1, [])
    row = _replication_command(pg_bin, conninfo, env, f"TIMELINE_HISTORY {timeline}", target)
    content = row.split("|", 1)[1]
    if content.startswith("\\x"):  # bytea, as psql shows it
        content = bytes.fromhex(content[2:].strip()).decode()
    return ServerTimeline(timeline, parse_history(content))


def _replication_command(pg_bin: Path, conninfo: str, env: dict[str, str], command: str, target: str) -> str:
    proc = subprocess.run(
        [str(pg_bin / "psql"), "-X", "-A", "-t", "-w", "-d", _replication(conninfo), "-c", command],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    if proc.returncode != 0:
        raise EngineError(f"target {target}: {command} failed: {proc.stderr.strip()[:300]}")
    return proc.stdout.rstrip("\n")


def _replication(conninfo: str) -> str:
    """The same conninfo, asking for a physical replication connection."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return conninfo + ("&" if "?" in conninfo else "?") + "replication=true"
    return f"{conninfo} replication=true"
