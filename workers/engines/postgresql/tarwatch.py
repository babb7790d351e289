"""Keep one member of a tar stream as it flows past, without buffering or re-reading the stream.

The full backup uses it to keep PostgreSQL's own `backup_manifest` (every file's size and modification
time) from pg_basebackup's tar, which the differential layer later compares the data directory against.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

BLOCK = 512


class TarMemberWatcher:
    def __init__(self, name: str, limit: int = 256 * 1024 * 1024) -> None:
        self.name = name
        self.limit = limit
        self.captured: bytes | None = None
        self._header = bytearray()
        self._data_left = 0  # bytes of the current member's data still to come
        self._pad_left = 0  # then its padding to a whole block
        self._capture: bytearray | None = None

    def tee(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.feed(chunk)
            yield chunk

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self._data_left:
                take = min(self._data_left, len(view))
                if self._capture is not None:
                    self._capture += view[:take]
                self._data_left -= take
                view = view[take:]
                if not self._data_left and self._capture is not None:
                    self.captured, self._capture = bytes(self._capture), None
            elif self._pad_left:
                take = min(self._pad_left, len(view))
                self._pad_left -= take
                view = view[take:]
            else:
                take = min(BLOCK - len(self._header), len(view))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == BLOCK:
                    self._start_member(bytes(self._header))
                    self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if not any(header):
            return  # end-of-archive blocks
        size = _size(header[124:136])
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        full_name = f"{prefix}/{name}" if prefix else name
        self._data_left = size
        self._pad_left = (-size) % BLOCK
        wanted = full_name.removeprefix("./") == self.name and size <= self.limit
        self._capture = bytearray() if wanted else None
        if wanted and size == 0:
            self.captured, self._capture = b"", None


def _size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0
