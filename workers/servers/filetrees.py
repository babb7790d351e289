"""File-tree snapshots of a server: content-defined chunks, deduplicated across snapshots, encrypted.

Each regular file is cut into chunks by content (FastCDC, about 300 KiB on average), so an edit moves only the
chunks it touches. A chunk is stored once per server, at `servers/<S>/chunks/<id[:2]>/<id>.dv`, its id
a keyed hash of its bytes (`Keyring.content_id`: equal content gets equal names, but nobody without the
keys can test the bucket for a known file). A snapshot is the manifest listing every entry (path,
type, mode, owner, mtime, size, chunk ids), written last as the commit point at
`servers/<S>/snapshots/<id>.json.dv`. A file whose size and mtime match the previous snapshot reuses
its chunk list without being read again. The walk never follows a link: each folder and file is
opened relative to its parent's descriptor with O_NOFOLLOW and must be what was listed. Restores are
in `tree_restore`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pyfastcdc import FastCDC

from workers.errors import PermanentError
from workers.repository import catalog
from workers.repository.errors import IntegrityError
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

# 256 KiB on average: an edit rewrites about a quarter MiB of chunks, not megabytes.
MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 64 * 1024, 256 * 1024, 1024 * 1024
# FastCDC 2020 (pyfastcdc, compiled), normalized chunking level 1, the paper's gear table. Chunks are
# addressed by content, so a change of chunker only costs one snapshot's worth of new chunks.
CHUNKER = FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK, normalized_chunking=1)
UPLOAD_THREADS = 8
MAX_IN_FLIGHT = 16  # chunks read but not yet stored: bounds memory to about 16 MiB
MANIFEST_FORMAT = 1


class UnreadablePath(PermanentError):
    """A configured path cannot be read; the snapshot is not recorded."""


def snapshots_prefix(server: str) -> str:
    return f"servers/{server}/snapshots/"


def manifest_key(server: str, snapshot_id: str) -> str:
    return f"{snapshots_prefix(server)}{snapshot_id}.json.dv"


def chunk_key(server: str, chunk_id: str) -> str:
    return f"servers/{server}/chunks/{chunk_id[:2]}/{chunk_id}.dv"


def list_snapshots(repo: ObjectRepository, server: str) -> list[dict[str, Any]]:
    """Committed snapshots of `server`, oldest first."""
    found = []
    for key in repo.list_keys(snapshots_prefix(server)):
        if key.endswith(".json.dv"):
            manifest = repo.get_json(key)
            # Retention deletes the chunks no listed snapshot uses: skipping one would delete its data.
            if not isinstance(manifest, dict):
                raise IntegrityError("it decrypted fine but is not a snapshot manifest", key)
            found.append(manifest)
    return sorted(found, key=lambda m: m["snapshot_id"])


@dataclass
class _Counts:
    files: int = 0
    bytes: int = 0
    reused_files: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    stored_new_bytes: int = 0
    known: set[str] = field(default_factory=set)

    def add(self, stored: tuple[int, int]) -> None:
        """Count one chunk upload's (plain, stored) bytes; (0, 0) when it was there already."""
        plain, stored_size = stored
        if plain:
            self.new_chunks += 1
            self.new_bytes += plain
            self.stored_new_bytes += stored_size


def take_snapshot(
    repo: ObjectRepository,
    server: str,
    roots: tuple[str, ...],
    *,
    snapshot_id: str,
    extra: dict[str, Any],
    on_progress: Callable[[str], None] = log.info,
) -> tuple[dict[str, Any], bool]:
    """Snapshot `roots` as `snapshot_id`; (manifest, False) if that snapshot was already committed."""
    key = manifest_key(server, snapshot_id)
    if repo.exists(key):
        existing = repo.get_json(key)
        assert isinstance(existing, dict)
        return existing, False
    for root in roots:
        if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
            raise UnreadablePath(f"paths: {root} is not a readable directory on this host")
    previous = list_snapshots(repo, server)
    earlier = {(e["root"], e["path"]): e for e in previous[-1]["entries"]} if previous else {}
    # Every chunk the server already has, from one listing (a few requests per thousand chunks) rather
    # than a HEAD per chunk: also finds what an unfinished earlier attempt stored.
    stored = {chunk_id_of(listed.key) for listed in repo.store.list_entries(f"servers/{server}/chunks/")}
    counts = _Counts(known=stored)
    started = catalog.iso(datetime.now().astimezone())
    entries: list[dict[str, Any]] = []
    with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="chunk-upload") as pool:
        in_flight: list[Future[tuple[int, int]]] = []
        for root in roots:
            for path, info, folder, name in _walk(Path(root)):
                entry = _entry(root, path, info, folder, name)
                if stat.S_ISREG(info.st_mode):
                    before = earlier.get((entry["root"], entry["path"]))
                    if before is not None and (before["size"], before["mtime_ns"]) == (
                        info.st_size,
                        info.st_mtime_ns,
                    ):
                        entry["chunks"] = before["chunks"]
                        counts.reused_files += 1
                    else:
                        fd = _open_file(folder, name, info, path)
                        if fd is None:
                            continue
                        entry["chunks"] = _store_chunks(repo, server, fd, path, counts, pool, in_flight)
                    counts.files += 1
                    counts.bytes += info.st_size
                entries.append(entry)
                if len(entries) % 10_000 == 0:
                    on_progress(f"{len(entries)} entries, {counts.bytes / 2**20:.0f} MiB scanned")
        for future in in_flight:
            counts.add(future.result())
    manifest = {
        "format": MANIFEST_FORMAT,
        "server": server,
        "snapshot_id": snapshot_id,
        "driver": "files",
        "roots": list(roots),
        "started_at": started,
        "finished_at": catalog.iso(datetime.now().astimezone()),
        "files": counts.files,
        "bytes": counts.bytes,
        "reused_files": counts.reused_files,
        "new_chunks": counts.new_chunks,
        "new_bytes": counts.new_bytes,
        "stored_new_bytes": counts.stored_new_bytes,
        **extra,
        "entries": entries,
    }
    return repo.commit_json(key, manifest)


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result, int, str]]:
    """Every entry under `root` (itself first), parents before children, never through a link: yields
    (path, lstat, descriptor of its open folder, name in it); the descriptor is valid until the next.

    Each folder is opened part by part from `root` with O_NOFOLLOW, and must be the very folder its
    parent listed: one swapped for a link (or anything else) meanwhile is skipped with a warning.
    """
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the configured path itself
    except OSError as e:
        raise UnreadablePath(f"paths: {root} cannot be read ({e.strerror})") from None
    try:
        info = os.fstat(top)
        yield root, info, top, "."
        stack: list[tuple[tuple[str, ...], os.stat_result]] = [((), info)]
        while stack:
            parts, info = stack.pop()
            folder = _open_folder(top, parts, info, root)
            if folder is None:
                continue
            try:
                try:
                    names = sorted(os.listdir(folder))
                except OSError as e:
                    raise UnreadablePath(
                        f"paths: {root.joinpath(*parts)} cannot be read ({e.strerror})"
                    ) from None
                for name in names:
                    try:
                        child = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we walked: it is simply not in this snapshot
                    if stat.S_ISDIR(child.st_mode):
                        yield root.joinpath(*parts, name), child, folder, name
                        stack.append(((*parts, name), child))
                    elif stat.S_ISREG(child.st_mode) or stat.S_ISLNK(child.st_mode):
                        yield root.joinpath(*parts, name), child, folder, name
                    # sockets, FIFOs and devices are not data: left out
            finally:
                os.close(folder)
    finally:
        os.close(top)


def _open_folder(top: int, parts: tuple[str, ...], listed: os.stat_result, root: Path) -> int | None:
    fd = os.dup(top)
    try:
        for part in parts:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
        if _same(os.fstat(fd), listed):
            return fd
    except PermissionError as e:
        os.close(fd)
        raise UnreadablePath(f"paths: {root.joinpath(*parts)} cannot be read ({e.strerror})") from None
    except OSError:
        pass  # replaced by a link (ELOOP), a file (ENOTDIR), or removed
    os.close(fd)
    log.warning("%s changed while the snapshot walked (never followed): skipped", root.joinpath(*parts))
    return None


def _open_file(folder: int, name: str, listed: os.stat_result, path: Path) -> int | None:
    """The listed file, opened without following a link; None (with a warning) if it was swapped."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except PermissionError as e:
        raise UnreadablePath(f"paths: {path} cannot be read ({e.strerror})") from None
    except OSError:
        fd = None  # replaced by a link (ELOOP) or removed
    if fd is not None and _same(os.fstat(fd), listed):
        return fd
    if fd is not None:
        os.close(fd)
    log.warning("%s changed while the snapshot walked (never followed): skipped", path)
    return None


def _same(opened: os.stat_result, listed: os.stat_result) -> bool:
    return (opened.st_dev, opened.st_ino, stat.S_IFMT(opened.st_mode)) == (
        listed.st_dev,
        listed.st_ino,
        stat.S_IFMT(listed.st_mode),
    )


def _entry(root: str, path: Path, info: os.stat_result, folder: int, name: str) -> dict[str, Any]:
    relative = path.relative_to(root).as_posix()
    kind = "dir" if stat.S_ISDIR(info.st_mode) else "symlink" if stat.S_ISLNK(info.st_mode) else "file"
    entry: dict[str, Any] = {
        "root": root,
        "path": relative,
        "type": kind,
        "mode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "mtime_ns": info.st_mtime_ns,
        "size": info.st_size if kind == "file" else 0,
    }
    if kind == "symlink":
        entry["target"] = os.readlink(name, dir_fd=folder)
    return entry


def _store_chunks(
    repo: ObjectRepository,
    server: str,
    fd: int,
    path: Path,
    counts: _Counts,
    pool: ThreadPoolExecutor,
    in_flight: list[Future[tuple[int, int]]],
) -> list[str]:
    ids = []
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size == 0:
            return []  # nothing to chunk
        try:
            for chunk in CHUNKER.cut_stream(f):
                chunk_id = repo.keyring.content_id(chunk.data)
                ids.append(chunk_id)
                if chunk_id in counts.known:
                    continue
                counts.known.add(chunk_id)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    counts.add(in_flight.pop(0).result())
                # A copy: the chunker reuses its buffer for the next chunk while this one uploads
                in_flight.append(
                    pool.submit(_put_chunk, repo, chunk_key(server, chunk_id), bytes(chunk.data))
                )
        except PermissionError as e:
            raise UnreadablePath(f"paths: {path} cannot be read ({e.strerror})") from None
    return ids


def _put_chunk(repo: ObjectRepository, key: str, data: bytes) -> tuple[int, int]:
    """Store one chunk; (plain, stored) bytes."""
    stored = repo.put_stream(key, [data])
    return len(data), stored.stored_size


def chunk_id_of(key: str) -> str:
    """The chunk id in a chunk's object key."""
    return key.rsplit("/", 1)[-1].removesuffix(".dv")
