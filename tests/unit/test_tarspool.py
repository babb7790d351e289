"""Tars read while a process writes them one after another, each freed and deleted once read."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from workers.engines.postgresql.tarspool import TarSpool, _hole_puncher

WRITER = """
import os, sys, time
folder = sys.argv[1]
os.mkdir(folder)
for name, size in (("16384.tar", 300_000), ("base.tar", 2_500_000)):
    with open(os.path.join(folder, name), "wb") as f:
        for i in range(0, size, 100_000):
            f.write(bytes([len(name) + i // 100_000 & 255]) * 100_000)
            f.flush()
            time.sleep(0.01)
with open(os.path.join(folder, "backup_manifest"), "w") as f:
    f.write("{}")
print("done", file=sys.stderr)
"""


def test_each_tar_is_read_whole_in_order_while_it_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "tars"
    lines: list[str] = []
    spool = TarSpool([sys.executable, "-c", WRITER, str(folder)], {}, folder, lines.append)

    read = {name: b"".join(chunks) for name, chunks in spool.archives()}

    assert list(read) == ["16384.tar", "base.tar"]
    assert [len(read["16384.tar"]), len(read["base.tar"])] == [300_000, 2_500_000]
    assert read["base.tar"][-1] == (len("base.tar") + 24) & 255
    assert spool.returncode == 0 and lines == ["done"]
    assert spool.manifest() == b"{}"
    assert sorted(p.name for p in folder.iterdir()) == ["backup_manifest"]  # each tar deleted once read


def test_bytes_read_are_freed_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "base.tar"
    path.write_bytes(b"x" * (8 << 20))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        _hole_puncher()(f.fileno(), 0, 8 << 20)
    assert path.stat().st_size == 8 << 20  # the writer's offset is untouched
    assert path.stat().st_blocks * 512 < 1 << 20


FAST_WRITER = """
import os, sys, time
folder = sys.argv[1]
os.mkdir(folder)
with open(os.path.join(folder, "base.tar"), "wb") as f:
    for i in range(80):
        f.write(bytes([i]) * 100_000)
        f.flush()
        time.sleep(0.005)
"""


def test_a_writer_far_ahead_of_the_reader_is_paused_so_the_spool_stays_bounded(
    tmp_path: Path, caplog
) -> None:
    # Given a writer that puts 8 MB in the spool in under a second, and a reader (a slow upload) far slower
    folder = tmp_path / "tars"
    spool = TarSpool(
        [sys.executable, "-c", FAST_WRITER, str(folder)], {}, folder, lambda _: None, max_pending=200_000
    )
    data = b""
    ahead = []
    for _, chunks in spool.archives():
        for chunk in chunks:
            data += chunk
            time.sleep(0.3)
            ahead.append((folder / "base.tar").stat().st_size - len(data))
    freeing_failed = [r for r in caplog.records if "cannot free" in r.getMessage()]

    # Then it was paused, never more than the limit and a poll's worth of writes ahead (unpaused: 6 MB)
    # and what was read was freed as it went
    assert len(data) == 8_000_000 and spool.returncode == 0
    assert not freeing_failed, "the spool could not free what it had read"
    assert spool.paused >= 1
    assert max(ahead) <= 200_000 + 1_000_000, max(ahead)
