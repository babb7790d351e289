"""The chunk-stream adapters: readers over iterators, and read-ahead in a thread."""

from __future__ import annotations

import threading

import pytest

from workers.repository.streams import ChunkReader, counted, prefetched


def test_chunk_reader_serves_any_read_sizes() -> None:
    reader = ChunkReader([b"abc", b"", b"defgh", b"i"])
    out = []
    while piece := reader.read(2):
        out.append(piece)
    assert b"".join(out) == b"abcdefghi"
    assert reader.read() == b""


def test_counted_reports_running_totals() -> None:
    seen: list[int] = []
    assert list(counted([b"ab", b"cde"], seen.append)) == [b"ab", b"cde"]
    assert seen == [2, 5]


def test_prefetched_yields_everything_in_order_from_another_thread() -> None:
    threads: set[str] = set()

    def source():
        for i in range(100):
            threads.add(threading.current_thread().name)
            yield bytes([i])

    assert b"".join(prefetched(source(), depth=3)) == bytes(range(100))
    assert threads == {"prefetch"}


def test_prefetched_passes_the_source_error_to_the_consumer() -> None:
    def source():
        yield b"ok"
        raise OSError("pipe broke")

    stream = prefetched(source())
    assert next(stream) == b"ok"
    with pytest.raises(OSError, match="pipe broke"):
        next(stream)


def test_a_consumer_that_stops_early_closes_the_source() -> None:
    closed = threading.Event()

    def source():
        try:
            while True:
                yield b"x" * 1024
        finally:
            closed.set()

    stream = prefetched(source(), depth=2)
    next(stream)
    stream.close()
    assert closed.wait(5)
