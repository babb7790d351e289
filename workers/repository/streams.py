"""Adapters between iterators of byte chunks and the file objects that libraries want."""

from __future__ import annotations

import queue
import threading
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


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def prefetched(chunks: Iterable[bytes], depth: int = 4) -> Iterator[bytes]:
    """Iterate `chunks` in a thread of its own, up to `depth` chunks ahead of the consumer.

    Reading a pipe and hashing release the GIL, so this moves them off the thread that compresses and
    encrypts. Errors reach the consumer; a consumer that stops early stops (and closes) the source.
    """
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(chunks)
        try:
            for chunk in source:
                if not put(chunk):
                    return
            put(_DONE)
        except BaseException as error:
            put(_Failure(error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
