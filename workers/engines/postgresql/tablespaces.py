"""Where a restore lays out each tablespace, and how the restored data directory is pointed at them.

A backup lists its tablespaces (oid, name, original location). A restore maps each to a new folder --
by oid, name or original location, default `<into>.tablespaces/<oid>` beside the data directory -- and
links `pg_tblspc/<oid>` to it. The `tablespace_map` recovery reads is rewritten with the new folders,
because PostgreSQL recreates those links from it when it starts from a backup label.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskvault_core.errors import DeskvaultError


class TablespaceMappingError(DeskvaultError):
    """A tablespace mapping names no tablespace of the backup, or two tablespaces share a folder."""

    exit_code = 2


@dataclass(frozen=True)
class Tablespace:
    oid: int
    name: str
    location: str  # where it was on the backed-up server
    into: Path  # where this restore lays it out

    def describe(self) -> str:
        return f"tablespace {self.name} (oid {self.oid}, was {self.location})"


def listed(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The tablespaces a manifest records; a differential from before they were recorded has its map."""
    if manifest is None:
        return []
    if "tablespaces" in manifest:
        return list(manifest["tablespaces"])
    return [
        {"oid": oid, "name": str(oid), "location": loc}
        for oid, loc in parse_map(manifest.get("tablespace_map"))
    ]


def layout(
    manifests: Iterable[dict[str, Any] | None], into: Path, mapping: Mapping[str, Path] | None = None
) -> list[Tablespace]:
    """Each tablespace of the backups restored (the newest's name and location win), and its folder."""
    found: dict[int, dict[str, Any]] = {}
    for manifest in manifests:
        for space in listed(manifest):
            found[int(space["oid"])] = space
    mapping = dict(mapping or {})
    spaces = []
    for oid, space in sorted(found.items()):
        keys = [key for key in (str(oid), space["name"], space["location"]) if key in mapping]
        if keys:
            folder = Path(mapping[keys[0]])
            for key in keys:
                mapping.pop(key)
        else:
            folder = into.parent / f"{into.name}.tablespaces" / str(oid)
        spaces.append(Tablespace(oid, space["name"], space["location"], folder.absolute()))
    if mapping:
        known = ", ".join(f"{s.name} (oid {s.oid}, {s.location})" for s in spaces) or "none"
        raise TablespaceMappingError(
            f"--tablespace {', '.join(sorted(mapping))}: no such tablespace in this backup; it has: {known}"
        )
    folders = [s.into for s in spaces]
    if len(set(folders)) != len(folders) or into.absolute() in folders:
        raise TablespaceMappingError(
            "each tablespace needs a folder of its own, apart from the data directory"
        )
    return spaces


def link(into: Path, spaces: list[Tablespace]) -> None:
    """Point `pg_tblspc/<oid>` at each restored folder, and write the `tablespace_map` that says so."""
    links = into / "pg_tblspc"
    links.mkdir(mode=0o700, exist_ok=True)
    for space in spaces:
        link_path = links / str(space.oid)
        if link_path.is_symlink() or link_path.is_file():
            link_path.unlink()
        os.symlink(space.into, link_path)
    write_map(into, spaces)


def write_map(into: Path, spaces: list[Tablespace]) -> None:
    path = into / "tablespace_map"
    if not spaces:
        path.unlink(missing_ok=True)
        return
    path.write_text("".join(f"{s.oid} {_escape(str(s.into))}\n" for s in spaces))


def parse_map(text: str | None) -> list[tuple[int, str]]:
    """`tablespace_map` lines: `<oid> <path>`, with backslash before a newline, CR or backslash in it."""
    entries, line, escaped = [], "", False
    for ch in text or "":
        if escaped:
            line, escaped = line + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == "\n":
            oid, _, location = line.partition(" ")
            entries.append((int(oid), location))
            line = ""
        else:
            line += ch
    return entries


def _escape(path: str) -> str:
    return "".join("\\" + ch if ch in "\\\n\r" else ch for ch in path)
