"""Adapters between iterators of byte chunks and the file objects that libraries want."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator


def counted(chunks: Iterable[bytes], on_progress: Callable[[int], object]) -> Iterator[bytes]:
    """Pass chunks through, reporting the running byte count after each."""
    done = 0
    for chunk in chunks:
        done += len(chunk)
        on_progress(done)
        yield chunk


class ChunkReader:
    """A `read(n)` file over an iterator of byte chunks (short reads allowed), for zstandard and tarfile."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._current = b""
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        while self._offset >= len(self._current):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._current, self._offset = chunk, 0
        if size < 0:
            size = len(self._current) - self._offset
        if self._offset == 0 and size >= len(self._current):
            out = self._current
        else:
            out = self._current[self._offset : self._offset + size]
        self._offset += len(out)
        return out
