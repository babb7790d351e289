"""What a file-level backup copies from a data directory, and the file list it keeps of it.

Both kinds of backup read the data directory themselves under the backup API (a full taken where the
worker runs on the database host, and every differential): they copy what pg_basebackup would, listed
here once. The file list holds what PostgreSQL's own `backup_manifest` does for each file (path, size,
modification time) and the part it is in, so a differential compares against a full the same way
whichever way it was taken.
"""

from __future__ import annotations

import calendar
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import PermanentError
from workers.repository.errors import IntegrityError
from workers.repository.objects import ObjectRepository

# Like pg_basebackup: folders whose contents a backup never needs (they are kept, empty), and files it
# never copies.
SKIP_CONTENTS = {
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
}
SKIP_FILES = {
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "recovery.signal",
    "standby.signal",
    "backup_manifest",
}
SKIP_ANYWHERE = {"pg_internal.init"}  # relation cache files, rebuilt at start
FILE_LIST_FORMAT = 2


class UnreadableDataDirectory(PermanentError):
    """Part of the data directory cannot be read by this worker: dead-lettered with the reason, since a
    retry reads it no better."""


@dataclass(frozen=True, slots=True)  # slots: a cluster of many tenants lists hundreds of thousands
class DataFile:
    """A file to copy, as listed: its path relative to the data directory, size and modification time."""

    path: str
    size: int
    mtime: float


def walk(datadir: Path) -> tuple[list[DataFile], list[str]]:
    """Every file a backup copies and every folder it recreates (the skipped ones too, empty).

    A tablespace's files are listed under `pg_tblspc/<oid>/`, through its link; the link itself is no
    folder of the backup's (a restore makes its own).
    """
    files: list[DataFile] = []
    folders: list[str] = []
    _walk_tree(datadir, datadir, files, folders)
    links = datadir / "pg_tblspc"
    for entry in sorted(os.scandir(links), key=lambda e: e.name) if links.is_dir() else ():
        if entry.is_symlink():  # os.walk does not follow links; an in-place tablespace was walked above
            _walk_tree(datadir, links / entry.name, files, folders)
    return files, folders


def _walk_tree(datadir: Path, top: Path, files: list[DataFile], folders: list[str]) -> None:
    for root, dirs, names in os.walk(top, onerror=_unreadable):
        rel_root = os.path.relpath(root, datadir)
        if rel_root != "." and not (root == str(top) and top != datadir):
            folders.append(rel_root)
        if rel_root in SKIP_CONTENTS:
            dirs.clear()
            if rel_root == "pg_wal":
                folders.append("pg_wal/archive_status")
            continue
        dirs[:] = sorted(d for d in dirs if d != "pgsql_tmp")
        for name in sorted(names):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if skipped(rel):
                continue
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # dropped while we looked: the WAL replays the drop
            if stat.S_ISREG(st.st_mode):
                files.append(DataFile(rel, st.st_size, st.st_mtime))


def _unreadable(error: OSError) -> None:
    """os.walk skips a folder it cannot list unless told otherwise: a backup missing it would restore
    as a broken cluster, so that is an error. A folder dropped while we looked is not (the WAL replays
    the drop)."""
    if isinstance(error, FileNotFoundError):
        return
    raise UnreadableDataDirectory(
        f"cannot list {error.filename} in the data directory ({error.strerror}); the backup worker must "
        'be able to read all of it: run it as the server\'s user (or root), or set full_method = "stream"'
    )


def skipped(path: str) -> bool:
    """Whether a backup leaves `path` (relative to the data directory) out."""
    top, _, _ = path.partition("/")
    name = path.rsplit("/", 1)[-1]
    return top in SKIP_CONTENTS or path in SKIP_FILES or name in SKIP_ANYWHERE or name.startswith("pgsql_tmp")


def file_list_lines(files: list[DataFile], part_of: dict[str, str]) -> Iterator[bytes]:
    """The backup's file list, one JSON line per file (`[path, size, mtime, part]`) in path order,
    after a header line. Written as it is read, so a cluster of many tenants (hundreds of thousands of
    files) costs no list held whole in memory, and read back the same way (`listed_files`)."""
    yield json.dumps({"format": FILE_LIST_FORMAT}).encode() + b"\n"
    for f in sorted(files, key=_path):
        line = [f.path, f.size, int(f.mtime), part_of.get(f.path)]
        yield json.dumps(line, ensure_ascii=False).encode() + b"\n"


def listed_files(repo: ObjectRepository, manifest: dict[str, Any]) -> Iterator[tuple[str, int, int]]:
    """`(path, size, modification time in whole seconds)` of every file a full copied, in path order:
    from its own file list, or from PostgreSQL's `backup_manifest` for a full through pg_basebackup."""
    key = manifest["file_list"]
    if manifest.get("file_list_format") != FILE_LIST_FORMAT:
        document = repo.get_json(key)
        found = []
        for entry in document["Files"]:  # type: ignore[index]
            stamp = time.strptime(entry["Last-Modified"], "%Y-%m-%d %H:%M:%S %Z")
            found.append((entry["Path"], int(entry["Size"]), calendar.timegm(stamp)))
        yield from sorted(found)
        return
    lines = _lines(repo.get_stream(key))
    header = json.loads(next(lines, b"{}"))
    if header.get("format") != FILE_LIST_FORMAT:
        raise IntegrityError(f"it is not a file list of format {FILE_LIST_FORMAT}", key)
    before = ""
    for line in lines:
        path, size, mtime, _part = json.loads(line)
        if path <= before:
            raise IntegrityError(f"its files are not in path order at {path!r}", key)
        before = path
        yield path, int(size), int(mtime)


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        yield from (line for line in whole if line)
    if rest:
        yield rest


def _path(f: DataFile) -> str:
    return f.path
