"""A file-level backup as parts: independently compressed and encrypted objects, made and restored in
parallel.

Files are grouped by database folder (`base/<oid>`, or `pg_tblspc/<oid>/<version>/<oid>` in a
tablespace), everything else is the cluster's group, so that one database can be restored from its own
parts. Within a group, files are packed in order into tar parts of about `part_bytes`; a file larger
than that (a relation's 1 GiB segment) is cut into slices of `part_bytes`, each a part of its own that
holds the raw bytes of that range. The first part, `folders`, holds every folder of the backup, so that
the others can be laid out in any order and at once.

Restoring: the folders part first, then every other part at once across `parallel` threads; tar parts
are unpacked by GNU tar and slices written at their offset by dd, both as the server's user with umask
077, each byte checked as it streams in (see `untar`, `targuard`).
"""

from __future__ import annotations

import contextvars
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.engines.postgresql.datafiles import DataFile, UnreadableDataDirectory
from workers.engines.postgresql.targuard import TarGuard, checked_path
from workers.engines.postgresql.untar import UnpackError, feed_as_server, unpack_tar
from workers.repository.objects import ObjectRepository, StoredObject

LAYOUT = "parts"  # a manifest's `layout` when its objects are parts
PART_BYTES = 64 * 2**20
READ_SIZE = 2**20
UPLOAD_PART_BYTES = 8 * 2**20  # S3 parts of a part's object: a compressed part is a few of them
CLUSTER_GROUP = "cluster"
FOLDERS_PART = "folders"


@dataclass
class Part:
    """One object of a parts backup: whole files (a tar), or one range of one large file (a slice)."""

    name: str
    group: str
    files: list[DataFile] = field(default_factory=list)
    slice_of: DataFile | None = None
    offset: int = 0
    length: int = 0
    folders: list[str] = field(default_factory=list)

    @property
    def plain_bytes(self) -> int:
        return self.length if self.slice_of is not None else sum(f.size for f in self.files)


def group_of(path: str) -> str:
    """The group of a file: its database's folder, or the cluster's for everything else."""
    parts = path.split("/")
    if parts[0] == "base" and len(parts) >= 3:
        return "/".join(parts[:2])
    if parts[0] == "pg_tblspc" and len(parts) >= 5:
        return "/".join(parts[:4])
    return CLUSTER_GROUP


def plan(files: list[DataFile], folders: list[str], *, part_bytes: int | None = None) -> list[Part]:
    """The parts of a backup of `files`: the folders part, then each group's parts, largest group first
    (so the longest work starts first when they run at once). `part_bytes`: default PART_BYTES."""
    part_bytes = part_bytes or PART_BYTES
    groups: dict[str, list[DataFile]] = {}
    for f in files:
        groups.setdefault(group_of(f.path), []).append(f)
    parts = [Part(FOLDERS_PART, CLUSTER_GROUP, folders=list(folders))]
    ordered = sorted(groups.items(), key=lambda g: (-sum(f.size for f in g[1]), g[0]))
    for group, members in ordered:
        packed: list[DataFile] = []
        packed_bytes = 0
        for f in members:
            if f.size > part_bytes:
                for offset in range(0, f.size, part_bytes):
                    length = min(part_bytes, f.size - offset)
                    parts.append(_named(parts, group, slice_of=f, offset=offset, length=length))
                continue
            if packed and packed_bytes + f.size > part_bytes:
                parts.append(_named(parts, group, files=packed))
                packed, packed_bytes = [], 0
            packed.append(f)
            packed_bytes += f.size
        if packed:
            parts.append(_named(parts, group, files=packed))
    return parts


def _named(parts: list[Part], group: str, **what: Any) -> Part:
    return Part(f"part-{len(parts):05d}", group, **what)


def stream(datadir: Path, part: Part) -> Iterator[bytes]:
    """A part's plaintext: a tar of its folders or files, or the raw bytes of its slice.

    Each file is cut or zero-padded to the size it had when listed, like pg_basebackup: a file that
    changes while it is copied is repaired by replaying the WAL from the backup's checkpoint.
    """
    if part.slice_of is not None:
        yield from _read_range(datadir / part.slice_of.path, part.offset, part.length)
        return
    now = int(time.time())
    for folder in part.folders:
        info = tarfile.TarInfo(folder)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, now
        yield info.tobuf(format=tarfile.GNU_FORMAT)
    for f in part.files:
        info = tarfile.TarInfo(f.path)
        info.size, info.mode, info.mtime = f.size, 0o600, int(f.mtime)
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        yield from _read_range(datadir / f.path, 0, f.size)
        if f.size % tarfile.BLOCKSIZE:
            yield bytes(tarfile.BLOCKSIZE - f.size % tarfile.BLOCKSIZE)
    yield bytes(2 * tarfile.BLOCKSIZE)


def _read_range(path: Path, offset: int, length: int) -> Iterator[bytes]:
    left = length
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while left and (chunk := f.read(min(READ_SIZE, left))):
                left -= len(chunk)
                yield chunk
    except FileNotFoundError:
        pass  # dropped during the backup: zeros now, the WAL replays the drop
    except PermissionError as e:
        raise UnreadableDataDirectory(
            f"cannot read {path} ({e.strerror}); the backup worker must be able to read the whole data "
            'directory: run it as the server\'s user (or root), or set full_method = "stream"'
        ) from None
    while left:
        n = min(READ_SIZE, left)
        left -= n
        yield bytes(n)


def entry(part: Part, stored: StoredObject) -> dict[str, Any]:
    """How a manifest lists a part (the file list says which files each holds)."""
    listed: dict[str, Any] = {
        "name": part.name,
        "key": stored.key,
        "group": part.group,
        "plain_size": stored.plain_size,
        "stored_size": stored.stored_size,
        "sha256": stored.sha256,
        "key_id": stored.key_id,
    }
    if part.slice_of is not None:
        listed["slice"] = {"path": part.slice_of.path, "offset": part.offset, "length": part.length}
    return listed


def store_all(
    repo: ObjectRepository,
    datadir: Path,
    parts: list[Part],
    prefix: str,
    *,
    parallel: int,
    max_rate: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Upload every part (as `<prefix><part name>.dv`), `parallel` at once; their manifest entries, in
    the parts' order. With
    `max_rate` (bytes per second), the data directory is read no faster than that, all parts together.

    On the first failure the others are stopped before their uploads complete, and nothing is committed.
    """
    progress = _Progress(on_progress, max_rate)

    def one(part: Part) -> dict[str, Any]:
        # One upload per core already: each compresses in its own thread with one S3 part in flight
        # (and one filling) of the smallest size S3 takes, which bounds the memory to two S3 parts per
        # part in flight.
        one_each = 1 if parallel > 1 else None
        part_size = UPLOAD_PART_BYTES if parallel > 1 else None
        plain = progress.counted(stream(datadir, part))
        stored = repo.put_stream(
            f"{prefix}{part.name}.dv",
            plain,
            zstd_threads=one_each,
            upload_threads=one_each,
            part_size=part_size,
        )
        return entry(part, stored)

    return _all_at_once(one, parts, parallel, "backup", progress.stop)


def restore_all(
    repo: ObjectRepository,
    parts: list[dict[str, Any]],
    into: Path,
    archive: str,
    *,
    parallel: int,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Lay out the parts listed in a manifest under `into`: the folders part, then the rest at once."""
    progress = _Progress(on_progress)

    def one(listed: dict[str, Any]) -> None:
        plain = progress.counted(
            repo.get_stream(listed["key"], expect_sha256=listed["sha256"], expect_size=listed["plain_size"])
        )
        what = f"{archive}/{listed['name']}"
        if "slice" in listed:
            _write_slice(plain, into, listed["slice"], what)
        else:
            # Parts hold files and folders only: no link, and nothing but the tablespaces' links on the way.
            unpack_tar(plain, into, TarGuard(what))

    folders = [p for p in parts if p["name"] == FOLDERS_PART]
    for listed in folders:
        one(listed)
    # Largest first: a large part started last would run on alone, one core idle
    rest = sorted((p for p in parts if p["name"] != FOLDERS_PART), key=lambda p: -p["plain_size"])
    _all_at_once(one, rest, parallel, "restore", progress.stop)


def kept(listed: list[dict[str, Any]], keeps: Callable[[str], bool] | None) -> list[dict[str, Any]]:
    """The parts of a manifest's list whose group `keeps` keeps (all of them without `keeps`)."""
    return [p for p in listed if keeps is None or keeps(p.get("group", CLUSTER_GROUP))]


def _write_slice(chunks: Iterable[bytes], into: Path, where: dict[str, Any], what: str) -> None:
    """Write a slice's bytes at its offset with dd, as the server's user, never through a final link.

    The file's folder came with the folders part; the file is created (0600 under umask 077) by the
    first slice to arrive, and slices of one file may arrive in any order.
    """
    path = checked_path(str(where["path"]), f"{what}: slice")
    offset, length = int(where["offset"]), int(where["length"])
    if offset < 0 or length < 0:
        raise UnpackError(f"{what}: slice of {path} has a negative offset or length")
    command = [
        "dd",
        f"of={path}",
        "bs=1M",
        f"seek={offset}",
        "oflag=seek_bytes,nofollow",
        "conv=notrunc",
        "status=none",
    ]
    returncode, said = feed_as_server(command, _at_most(chunks, length, f"{what}: slice of {path}"), into)
    if returncode != 0:
        raise UnpackError(f"dd could not write {what} into {into / path} (exit {returncode}): {said}")


def _at_most(chunks: Iterable[bytes], length: int, what: str) -> Iterator[bytes]:
    written = 0
    for chunk in chunks:
        written += len(chunk)
        if written > length:
            raise UnpackError(f"{what} holds more than its {length} bytes")
        yield chunk


class _Stopped(Exception):
    """A part stopped because another one failed."""


def _all_at_once(
    work: Callable[[Any], Any], items: list[Any], parallel: int, label: str, stop: threading.Event
) -> list[Any]:
    """`work` on every item, `parallel` at once, each in the caller's context (its fence above all).

    On the first failure `stop` is set: items not yet started are skipped, running ones stop at their
    next chunk (their uploads are aborted), and the first failure is raised once all have ended.
    """
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def run(index: int, item: Any) -> None:
        if stop.is_set():
            return
        try:
            results[index] = work(item)
        except _Stopped:
            pass
        except BaseException as e:
            errors.append(e)
            stop.set()

    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix=f"parts-{label}") as pool:
        futures = [pool.submit(contextvars.copy_context().run, run, i, item) for i, item in enumerate(items)]
        wait(futures)
    if errors:
        raise errors[0]
    return results


class _Progress:
    """One byte count for parts moving at once: `on_progress(total so far)` from any thread; with
    `max_rate` (bytes per second), each chunk waits until the total is within that rate."""

    def __init__(self, on_progress: Callable[[int], None] | None, max_rate: int = 0) -> None:
        self.stop = threading.Event()  # set when any part failed: the others end at their next chunk
        self._on_progress = on_progress
        self._max_rate = max_rate
        self._lock = threading.Lock()
        self._done = 0
        self._started = time.monotonic()

    def counted(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self.stop.is_set():
                raise _Stopped
            with self._lock:
                self._done += len(chunk)
                done = self._done
            if self._max_rate:
                ahead = done / self._max_rate - (time.monotonic() - self._started)
                if ahead > 0:
                    time.sleep(ahead)
            if self._on_progress is not None:
                self._on_progress(done)
            yield chunk


def default_parallel() -> int:
    """One part at a time per core."""
    return max(1, os.cpu_count() or 1)
