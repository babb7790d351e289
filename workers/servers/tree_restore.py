"""Recreate a file snapshot under a folder so that nothing in it can write anywhere else.

The manifest is authenticated, yet a restore treats it as hostile, and the folder as shared with
someone who has a shell on the restore host:
- every entry's name is checked before anything is written: absolute names, `..` and empty parts are
  refused, naming the entry;
- files and folders are made relative to an open descriptor of their parent, each step opened with
  O_NOFOLLOW, in folders that stay 0700 until the end: nothing is written through a link, whoever
  made it, and nobody can slip one in meanwhile;
- symbolic links come last, once nothing else is written beneath them, and are never followed;
- setuid and setgid bits come back only with the file's owner (`owners=True`, as root): a setuid file
  owned by the root that restores it would be a root shell for whoever wrote the snapshot.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deskvault_core.errors import DeskvaultError
from deskvault_core.progress import ByteProgress
from workers.repository.errors import IntegrityError
from workers.repository.objects import ObjectRepository
from workers.servers.filetrees import chunk_key

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8
SET_ID_BITS = stat.S_ISUID | stat.S_ISGID
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeEntry(DeskvaultError):
    """A snapshot entry that would be written outside the restore folder, or through a link."""


def entry_name(entry: dict[str, Any]) -> str:
    return f"{entry.get('root')!s}/{entry.get('path')!s}".replace("/./", "/").removesuffix("/.")


def entry_parts(entry: dict[str, Any]) -> tuple[str, ...]:
    """Where `entry` goes below the restore folder, as path parts; refuses any name that could escape."""
    root, path = entry.get("root"), entry.get("path")
    if not isinstance(root, str) or not root.startswith("/") or not isinstance(path, str):
        raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: its root must be an absolute path")
    if path.startswith("/"):
        raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: an absolute path is refused")
    parts = _parts(root.strip("/"), entry) + _parts("" if path == "." else path, entry)
    if entry.get("type") not in ("dir", "file", "symlink") or (not parts and entry["type"] != "dir"):
        raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: type {entry.get('type')!r} is not restorable")
    return parts


def _check_tree(placed: list[tuple[tuple[str, ...], dict[str, Any]]]) -> None:
    """No entry twice, and nothing beneath a file or a link (which would make it a folder, or a way out)."""
    seen: set[tuple[str, ...]] = set()
    parents: set[tuple[str, ...]] = set()
    for parts, entry in placed:
        if parts in seen:
            raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: listed twice")
        seen.add(parts)
        parents.update(parts[:i] for i in range(len(parts)))
    for parts, entry in placed:
        if entry["type"] != "dir" and parts in parents:
            raise UnsafeEntry(
                f"snapshot entry {entry_name(entry)}: a {entry['type']} with entries beneath it"
            )


def _parts(name: str, entry: dict[str, Any]) -> tuple[str, ...]:
    if not name:
        return ()
    parts = tuple(name.split("/"))
    for part in parts:
        if part in ("", ".", "..") or "\0" in part:
            raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: {part!r} in a path is refused")
    return parts


def restore_snapshot(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    into: Path,
    *,
    owners: bool = False,
    on_progress: Callable[[str], None] = log.info,
) -> int:
    """Recreate every entry of a snapshot under `into/<root without its leading />`; returns bytes
    written. With `owners` (root only) each entry gets its recorded owner, and files keep setuid/setgid."""
    if owners and os.geteuid() != 0:
        raise DeskvaultError("--owners: only root can give files their owners back; run it as root")
    placed = [(entry_parts(entry), entry) for entry in manifest["entries"]]
    _check_tree(placed)  # all refused before anything is written
    into.mkdir(mode=0o700, parents=True, exist_ok=True)
    top = os.open(into, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.listdir(top):
            raise DeskvaultError(f"{into} is not empty; restore into a new or empty folder")
        folders = _Folders(top)
        for parts, entry in placed:
            if entry["type"] == "dir":
                os.close(folders.open(parts, entry, create=True))
        written = _write_files(repo, manifest, placed, folders, owners, on_progress)
        for parts, entry in placed:
            if entry["type"] == "symlink":
                _make_symlink(folders, parts, entry, owners)
        folders.close_cached()
        # Folders last, deepest first: writing into them changed their times, and a folder made
        # read-only early would refuse what goes in it.
        for parts, entry in sorted(placed, key=lambda p: len(p[0]), reverse=True):
            if entry["type"] == "dir":
                fd = folders.open(parts, entry, create=False)
                try:
                    _set_metadata(fd, entry, owners)
                finally:
                    os.close(fd)
    finally:
        os.close(top)
    on_progress(f"restored {len(placed)} entries, {written / 2**20:.1f} MiB")
    return written


def _write_files(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    placed: list[tuple[tuple[str, ...], dict[str, Any]]],
    folders: _Folders,
    owners: bool,
    on_progress: Callable[[str], None],
) -> int:
    server = manifest["server"]
    total = sum(entry["size"] for _, entry in placed if entry["type"] == "file")
    progress = ByteProgress("files", on_progress)
    written = 0
    with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="chunk-download") as pool:
        for parts, entry in placed:
            if entry["type"] != "file":
                continue
            with _new_file(folders, parts, entry) as fd:
                fetch = lambda chunk_id: _get_chunk(repo, server, chunk_id)  # noqa: E731
                for data in pool.map(fetch, entry["chunks"]):
                    _write_all(fd, data)
                    written += len(data)
                    progress(written, total)
                size = os.fstat(fd).st_size
                if size != entry["size"]:
                    raise IntegrityError(
                        f"restored {entry_name(entry)} has {size} bytes, not {entry['size']}"
                    )
                _set_metadata(fd, entry, owners)
    progress(total, total)
    return written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextmanager
def _new_file(folders: _Folders, parts: tuple[str, ...], entry: dict[str, Any]) -> Iterator[int]:
    parent = folders.parent(parts, entry)
    try:
        fd = os.open(parts[-1], _NEW_FILE_FLAGS, 0o600, dir_fd=parent)
    except OSError as e:
        raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: cannot be created ({e.strerror})") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _make_symlink(folders: _Folders, parts: tuple[str, ...], entry: dict[str, Any], owners: bool) -> None:
    parent, name = folders.parent(parts, entry), parts[-1]
    try:
        os.symlink(entry["target"], name, dir_fd=parent)
    except OSError as e:
        raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: cannot be created ({e.strerror})") from None
    if owners and "uid" in entry:
        os.chown(name, entry["uid"], entry["gid"], dir_fd=parent, follow_symlinks=False)
    times = (entry["mtime_ns"], entry["mtime_ns"])
    os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)


def _set_metadata(fd: int, entry: dict[str, Any], owners: bool) -> None:
    mode = entry["mode"] & 0o7777
    if owners and "uid" in entry:
        os.fchown(fd, entry["uid"], entry["gid"])  # (before chmod: chown clears setuid and setgid)
    elif entry["type"] == "file" and mode & SET_ID_BITS:
        log.warning(
            "%s: restored without its setuid/setgid bits (its owner is not restored)", entry_name(entry)
        )
        mode &= ~SET_ID_BITS
    os.fchmod(fd, mode)
    os.utime(fd, ns=(entry["mtime_ns"], entry["mtime_ns"]))


class _Folders:
    """Opens folders below the restore folder one part at a time, never through a link; keeps the
    last parent open, since a snapshot lists a folder's entries together."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._cached: tuple[tuple[str, ...], int] | None = None

    def open(self, parts: tuple[str, ...], entry: dict[str, Any], *, create: bool) -> int:
        fd = os.dup(self.top)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass  # made for an earlier entry (or a link, which the open below refuses)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as e:
            os.close(fd)
            why = "a link or a file is in its way" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
            raise UnsafeEntry(f"snapshot entry {entry_name(entry)}: refused ({why})") from None
        return fd

    def parent(self, parts: tuple[str, ...], entry: dict[str, Any]) -> int:
        if self._cached is None or self._cached[0] != parts[:-1]:
            self.close_cached()
            self._cached = (parts[:-1], self.open(parts[:-1], entry, create=True))
        return self._cached[1]

    def close_cached(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None


def _get_chunk(repo: ObjectRepository, server: str, chunk_id: str) -> bytes:
    key = chunk_key(server, chunk_id)
    data = b"".join(repo.get_stream(key))
    if repo.keyring.content_id(data) != chunk_id:
        # Decrypted fine, but holds other content: a chunk swapped in from another name.
        raise IntegrityError("its content does not match its name", key)
    return data
