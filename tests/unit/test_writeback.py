"""The restore's background writeback: it syncs while the block runs and stops with it, whatever happens."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from workers.engines.postgresql import writeback


def test_it_syncs_the_folders_while_the_block_runs_and_stops_with_it(monkeypatch, tmp_path) -> None:
    calls = []
    real = writeback._sync_file_system
    monkeypatch.setattr(writeback, "_sync_file_system", lambda f: (calls.append(f), real(f)))
    later = tmp_path / "made-during-the-block"
    with writeback.written_back_meanwhile([tmp_path, later], pause=0.01) as thread:
        # Waits for the syncs, not for a time: a sync on a busy host takes as long as its writes
        _until(lambda: calls.count(tmp_path) >= 3)
        later.mkdir()
        _until(lambda: later in calls)  # synced once it exists; missing before that was no error
    assert not thread.is_alive()
    settled = len(calls)
    time.sleep(0.05)
    assert len(calls) == settled  # no sync after the block


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writeback thread did not sync"
        time.sleep(0.01)


def test_a_failing_block_stops_it_too_and_its_error_comes_through(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="layout failed"):
        with writeback.written_back_meanwhile([tmp_path], pause=0.01) as thread:
            raise RuntimeError("layout failed")
    assert not thread.is_alive()


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache, as util-linux's fincore counts them."""
    said = subprocess.run(
        ["fincore", "--noheadings", "--bytes", "--output", "PAGES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(said.split()[0])


def test_settle_makes_the_restored_files_durable_and_drops_their_pages_only(tmp_path) -> None:
    restored, elsewhere = tmp_path / "restored", tmp_path / "elsewhere"
    (restored / "base" / "5").mkdir(parents=True)
    elsewhere.mkdir()
    data = os.urandom(4 * 2**20)
    files = [restored / "base" / "5" / "16384", restored / "PG_VERSION"]
    for f in files:
        f.write_bytes(data)
    other = elsewhere / "not-ours"
    other.write_bytes(data)
    (restored / "base" / "link").symlink_to(other)  # a link in the restore: its target is not ours
    assert all(_resident_pages(f) > 0 for f in [*files, other])

    assert writeback.settle([restored]) == len(files)

    assert [_resident_pages(f) for f in files] == [0, 0]
    assert _resident_pages(other) > 0
    assert all(f.read_bytes() == data for f in files)


def test_settle_names_a_folder_it_cannot_sync(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        writeback.settle([tmp_path / "missing"])
