"""The restore_command script: copy what is there, wait for what is planned, report the rest missing."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from workers.engines.postgresql.walfetch import EXPECTED_LIST, FETCH_SCRIPT, STOPPED_MARKER, WalDownloads

SEGMENT = "000000010000000000000003"


def _fetch(wal_dir: Path, name: str, dest: Path, timeout: float = 10) -> subprocess.CompletedProcess:
    # PostgreSQL runs restore_command through the shell, as `restore_command(wal_dir)` spells it.
    return subprocess.run(
        ["sh", "-c", f'"{wal_dir / FETCH_SCRIPT}" "{name}" "{dest}"'], capture_output=True, timeout=timeout
    )


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    downloads = WalDownloads(None, tmp_path / "x.wal", lambda _: None)  # type: ignore[arg-type]
    downloads.close()
    return downloads.wal_dir


def test_a_file_in_place_is_copied(wal_dir: Path, tmp_path: Path) -> None:
    (wal_dir / SEGMENT).write_bytes(b"wal bytes")
    assert _fetch(wal_dir, SEGMENT, tmp_path / "out").returncode == 0
    assert (tmp_path / "out").read_bytes() == b"wal bytes"


def test_an_unplanned_file_is_missing_at_once(wal_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _fetch(wal_dir, "00000002.history", tmp_path / "out")
    assert result.returncode == 1
    assert time.monotonic() - started < 2
    assert not (tmp_path / "out").exists()


def test_a_planned_file_is_waited_for(wal_dir: Path, tmp_path: Path) -> None:
    (wal_dir / EXPECTED_LIST).write_text(SEGMENT + "\n")
    arrive = threading.Timer(1.0, (wal_dir / SEGMENT).write_bytes, args=(b"late",))
    arrive.start()
    started = time.monotonic()
    result = _fetch(wal_dir, SEGMENT, tmp_path / "out")
    arrive.join()
    assert result.returncode == 0
    assert time.monotonic() - started >= 0.9
    assert (tmp_path / "out").read_bytes() == b"late"


def test_waiting_ends_when_the_restore_gives_up(wal_dir: Path, tmp_path: Path) -> None:
    (wal_dir / EXPECTED_LIST).write_text(SEGMENT + "\n")
    threading.Timer(0.5, (wal_dir / STOPPED_MARKER).touch).start()
    assert _fetch(wal_dir, SEGMENT, tmp_path / "out").returncode == 1
    assert not (tmp_path / "out").exists()
