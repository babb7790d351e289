"""File-tree snapshots of a server: content-defined chunks, deduplicated across snapshots, encrypted.

Each regular file is cut into chunks by content (FastCDC, 256 KiB on average), so an edit moves only the
chunks it touches. A chunk is stored once per server, at `servers/<S>/chunks/<id[:2]>/<id>.dv`, its id
a keyed hash of its bytes (`Keyring.content_id`: equal content gets equal names, but nobody without the
keys can test the bucket for a known file). A snapshot is the manifest listing every entry (path,
type, mode, mtime, size, chunk ids), written last as the commit point at
`servers/<S>/snapshots/<id>.json.dv`. A file whose size and mtime match the previous snapshot reuses
its chunk list without being read again.
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

from fastcdc import fastcdc

from deskvault_core.errors import DeskvaultError
from workers.errors import PermanentError
from workers.repository import catalog
from workers.repository.errors import IntegrityError
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

# 256 KiB on average: an edit rewrites about a quarter MiB of chunks, not megabytes.
MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 64 * 1024, 256 * 1024, 1024 * 1024
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
            for path, info in _walk(Path(root)):
                entry = _entry(root, path, info)
                if stat.S_ISREG(info.st_mode):
                    counts.files += 1
                    counts.bytes += info.st_size
                    before = earlier.get((entry["root"], entry["path"]))
                    if before is not None and (before["size"], before["mtime_ns"]) == (
                        info.st_size,
                        info.st_mtime_ns,
                    ):
                        entry["chunks"] = before["chunks"]
                        counts.reused_files += 1
                    else:
                        entry["chunks"] = _store_chunks(
                            repo, server, path, info.st_size, counts, pool, in_flight
                        )
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


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry under `root` (itself included), parents before children, without following links."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            info = directory.lstat()
            yield directory, info
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise UnreadablePath(f"paths: {directory} cannot be read ({e.strerror})") from None
        for name in names:
            path = directory / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue  # removed while we walked: it is simply not in this snapshot
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)
            elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                yield path, info
            # sockets, FIFOs and devices are not data: left out


def _entry(root: str, path: Path, info: os.stat_result) -> dict[str, Any]:
    relative = path.relative_to(root).as_posix()
    kind = "dir" if stat.S_ISDIR(info.st_mode) else "symlink" if stat.S_ISLNK(info.st_mode) else "file"
    entry: dict[str, Any] = {
        "root": root,
        "path": relative,
        "type": kind,
        "mode": stat.S_IMODE(info.st_mode),
        "mtime_ns": info.st_mtime_ns,
        "size": info.st_size if kind == "file" else 0,
    }
    if kind == "symlink":
        entry["target"] = os.readlink(path)
    return entry


def _store_chunks(
    repo: ObjectRepository,
    server: str,
    path: Path,
    size: int,
    counts: _Counts,
    pool: ThreadPoolExecutor,
    in_flight: list[Future[tuple[int, int]]],
) -> list[str]:
    if size == 0:
        return []  # (mmap refuses an empty file; there is nothing to chunk)
    ids = []
    try:
        with path.open("rb") as f:
            for chunk in fastcdc(f, min_size=MIN_CHUNK, avg_size=AVG_CHUNK, max_size=MAX_CHUNK, fat=True):
                chunk_id = repo.keyring.content_id(chunk.data)
                ids.append(chunk_id)
                if chunk_id in counts.known:
                    continue
                counts.known.add(chunk_id)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    counts.add(in_flight.pop(0).result())
                in_flight.append(pool.submit(_put_chunk, repo, chunk_key(server, chunk_id), chunk.data))
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


def restore_snapshot(
    repo: ObjectRepository,
    manifest: dict[str, Any],
    into: Path,
    on_progress: Callable[[str], None] = log.info,
) -> int:
    """Recreate every entry of a snapshot under `into/<root without its leading />`; returns bytes written."""
    if into.exists() and any(into.iterdir()):
        raise DeskvaultError(f"{into} is not empty; restore into a new or empty folder")
    server = manifest["server"]
    written = 0
    directories = []
    with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="chunk-download") as pool:
        for entry in manifest["entries"]:
            target = into / entry["root"].lstrip("/") / entry["path"]
            if entry["type"] == "dir":
                target.mkdir(parents=True, exist_ok=True)
                directories.append((target, entry))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry["type"] == "symlink":
                os.symlink(entry["target"], target)
                os.utime(target, ns=(entry["mtime_ns"], entry["mtime_ns"]), follow_symlinks=False)
                continue
            with target.open("wb") as f:
                fetch = lambda chunk_id: _get_chunk(repo, server, chunk_id)  # noqa: E731
                for data in pool.map(fetch, entry["chunks"]):
                    f.write(data)
                    written += len(data)
            if target.stat().st_size != entry["size"]:
                raise IntegrityError(
                    f"restored {target} has {target.stat().st_size} bytes, not {entry['size']}"
                )
            os.chmod(target, entry["mode"])
            os.utime(target, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    # Directories last, deepest first: writing into them changed their times.
    for target, entry in sorted(directories, key=lambda d: len(d[0].parts), reverse=True):
        os.chmod(target, entry["mode"])
        os.utime(target, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    on_progress(f"restored {len(manifest['entries'])} entries, {written / 2**20:.1f} MiB")
    return written


def _get_chunk(repo: ObjectRepository, server: str, chunk_id: str) -> bytes:
    key = chunk_key(server, chunk_id)
    data = b"".join(repo.get_stream(key))
    if repo.keyring.content_id(data) != chunk_id:
        # Decrypted fine, but holds other content: a chunk swapped in from another name.
        raise IntegrityError("its content does not match its name", key)
    return data
