"""The base's progress while a restore lays it out: bytes, percent and rate, about once a second."""

from __future__ import annotations

import itertools

from deskvault_core.progress import MIB, ByteProgress, progress_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_gives_bytes_percent_and_rate() -> None:
    assert progress_line("base", 312 * MIB, 1024 * MIB, 312 / 85.2) == (
        "base: 312.0 of 1024.0 MiB (30%), 85.2 MiB/s"
    )
    assert progress_line("base", 0, 0, 0.0) == "base: 0.0 of 0.0 MiB (100%), 0.0 MiB/s"


def test_lines_come_at_most_once_a_second_and_once_more_at_the_end() -> None:
    clock, lines = Clock(), []
    progress = ByteProgress("base", lambda line: lines.append((clock.now, line)), clock=clock)
    for step in range(1, 101):  # a chunk of 1 MiB every 0.3 s: 30 s in all
        clock.now += 0.3
        progress(step * MIB, 100 * MIB)

    times = [t for t, _ in lines]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert len(lines) >= 20  # and about once a second, not less often
    assert lines[0][1] == "base: 4.0 of 100.0 MiB (4%), 3.3 MiB/s"  # the first once a second has passed
    assert lines[-1][1] == "base: 100.0 of 100.0 MiB (100%), 3.3 MiB/s"


def test_a_quick_copy_gives_only_the_final_line_once() -> None:
    clock, lines = Clock(), []
    progress = ByteProgress("base", lines.append, clock=clock)
    for done in (MIB, 2 * MIB, 4 * MIB, 4 * MIB):  # the end reported twice (a last empty chunk)
        clock.now += 0.1
        progress(done, 4 * MIB)

    assert lines == ["base: 4.0 of 4.0 MiB (100%), 13.3 MiB/s"]  # 4 MiB in 0.3 s
