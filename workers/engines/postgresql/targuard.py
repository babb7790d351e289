"""Check a backup's tar stream member by member before GNU tar sees any of it.

A backup archive is authenticated, yet a restore treats it as hostile: whoever holds the keys (or a
bug in what wrote it) must not be able to write outside the data directory. Each header is read as it
passes, and the chunk that holds it goes on to tar only once every member in it is allowed:
- names are relative, with no `..` part;
- members are regular files and folders; symbolic links only where PostgreSQL puts them (the
  `pg_tblspc/<oid>` of a tablespace the restore maps), never anything beneath one; no hard links,
  devices or FIFOs;
- a non-file member carries no data, so that this reading and tar's can never disagree on where the
  next header is.
GNU long names (`L`, `K`) and pax headers (`x`) are followed the way tar follows them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn

from deskvault_core.errors import DeskvaultError

BLOCK = 512
FILE_TYPES = {b"0", b"\0", b"7"}
DIR_TYPE, SYMLINK_TYPE = b"5", b"2"
LONG_NAME, LONG_LINK, PAX = b"L", b"K", b"x"
REFUSED_TYPES = {b"1": "a hard link", b"3": "a device", b"4": "a device", b"6": "a FIFO"}
PAX_KEYS = {"path", "linkpath", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "mode"}
MAX_EXTENDED = 1024 * 1024  # a long name or pax header is a few hundred bytes


class UnsafeMember(DeskvaultError):
    """A backup archive holds a member that could write outside the restore."""


def no_links(_name: str) -> bool:
    return False


class TarGuard:
    """`guard(chunks)` yields `chunks` unchanged, raising UnsafeMember before the chunk that holds a
    refused member. `link_allowed(name)` says where a symbolic link may be."""

    def __init__(self, archive: str, link_allowed: Callable[[str], bool] = no_links) -> None:
        self.archive = archive
        self.link_allowed = link_allowed
        self._header = bytearray()
        self._skip = 0  # data (and padding) bytes still to pass before the next header
        self._collect: bytearray | None = None  # an extended header's payload being read
        self._collect_left = 0
        self._collect_type = b""
        self._pending: dict[str, str] = {}  # what a long name or pax header says of the next member
        self._links: list[str] = []
        self._ended = False

    def __call__(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._feed(chunk)
            yield chunk

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and not self._ended:
            if self._skip:
                take = min(self._skip, end - pos)
                if self._collect is not None and self._collect_left:
                    piece = data[pos : pos + min(take, self._collect_left)]
                    self._collect += piece
                    self._collect_left -= len(piece)
                self._skip -= take
                pos += take
                if not self._skip and self._collect is not None:
                    self._extended(bytes(self._collect))
                    self._collect = None
                continue
            take = min(BLOCK - len(self._header), end - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == BLOCK:
                header, self._header = bytes(self._header), bytearray()
                self._on_header(header)

    def _on_header(self, h: bytes) -> None:
        if h == bytes(BLOCK):
            self._ended = True  # the end of the archive: tar reads no further
            return
        kind = h[156:157]
        size = self._number(h[124:136], "size")
        if kind in (LONG_NAME, LONG_LINK, PAX):
            if size > MAX_EXTENDED:
                self._refuse(_text(h[0:100]), f"an extended header of {size} bytes")
            self._collect, self._collect_left, self._collect_type = bytearray(), size, kind
            self._skip = _padded(size)
            return
        name = self._pending.pop("path", None) or _ustar_name(h)
        link = self._pending.pop("linkpath", None) or _text(h[157:257])
        if "size" in self._pending:
            size = self._number(self._pending.pop("size").encode(), "size")
        self._pending.clear()
        relative = self._checked_name(name)
        if not relative and kind != DIR_TYPE:
            self._refuse(name, "a name for the restore folder itself")
        if kind in FILE_TYPES:
            self._skip = _padded(size)
        elif kind in (DIR_TYPE, SYMLINK_TYPE):
            if size:
                self._refuse(name, "a folder or link that carries data")
            if kind == SYMLINK_TYPE:
                if not self.link_allowed(relative):
                    self._refuse(name, f"a symbolic link (to {link!r}) where PostgreSQL puts none")
                self._links.append(relative)
        else:
            self._refuse(name, REFUSED_TYPES.get(kind, f"a member of type {kind!r}"))

    def _checked_name(self, name: str) -> str:
        if not name:
            self._refuse(name, "an empty name")
        if name.startswith("/"):
            self._refuse(name, "an absolute name")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts or "\0" in name:
            self._refuse(name, "a name with '..'")
        relative = "/".join(parts)
        for link in self._links:
            if relative == link or relative.startswith(link + "/"):
                self._refuse(name, f"a member beneath the link {link}")
        return relative

    def _extended(self, payload: bytes) -> None:
        if self._collect_type == LONG_NAME:
            self._pending["path"] = _text(payload)
        elif self._collect_type == LONG_LINK:
            self._pending["linkpath"] = _text(payload)
        else:
            self._pending.update(self._pax(payload))

    def _pax(self, payload: bytes) -> dict[str, str]:
        records = {}
        while payload:
            try:
                length = int(payload[: payload.index(b" ")])
                record = payload[:length]
                key, _, value = record[record.index(b" ") + 1 : -1].partition(b"=")
            except ValueError:
                self._refuse("(pax header)", "a malformed pax record")
            if length <= 0 or record[-1:] != b"\n":
                self._refuse("(pax header)", "a malformed pax record")
            name = key.decode("utf-8", "replace")
            if name not in PAX_KEYS:
                self._refuse("(pax header)", f"the pax key {name!r}")
            records[name] = value.decode("utf-8", "surrogateescape")
            payload = payload[length:]
        return records

    def _number(self, field: bytes, what: str) -> int:
        if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes past 8 GiB
            if field[0] != 0x80:
                self._refuse("(header)", f"a negative {what}")
            return int.from_bytes(field[1:], "big")
        digits = field.replace(b"\0", b" ").strip()
        try:
            return int(digits, 8) if digits else 0
        except ValueError:
            self._refuse("(header)", f"a {what} that is not a number")

    def _refuse(self, name: str, why: str) -> NoReturn:
        raise UnsafeMember(
            f"backup archive {self.archive}: member {name!r} is refused ({why}); the restore stops here"
        )


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _ustar_name(h: bytes) -> str:
    name = _text(h[0:100])
    if h[257:263] == b"ustar\0" and (prefix := _text(h[345:500])):  # POSIX; GNU's magic has no prefix
        return f"{prefix}/{name}"
    return name


def checked_path(path: str, what: str) -> str:
    """A relative path inside the restore, as a deleted file of a differential names one."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or ".." in parts or not parts or "\0" in path:
        raise UnsafeMember(f"{what}: {path!r} is not a path inside the data directory; refused")
    return "/".join(parts)
