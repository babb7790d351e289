"""The WAL streamer's file handling that needs no services."""

from __future__ import annotations

import subprocess
from pathlib import Path

from deskvault_core.config import TargetSettings
from workers.engines.postgresql.timelines import Switch, parse_history
from workers.engines.postgresql.walarchive import archivable
from workers.engines.postgresql.walstream import WalStreamer, slot_name


def test_a_partial_segment_renamed_while_listed_is_left_for_the_next_round(tmp_path: Path) -> None:
    # Given pg_receivewal completed the segment between the listing and the upload
    streamer = WalStreamer(
        TargetSettings(name="main", engine="postgresql", conninfo="host=x"), None, tmp_path
    )
    vanished = tmp_path / "000000010000000000000003.partial"

    # Then the round goes on without an error, and nothing is recorded as uploaded
    assert streamer._upload_partial(vanished, None) == 0
    assert streamer._partial_seen == {}


def test_only_wal_files_are_archived() -> None:
    assert archivable("000000010000000000000003")
    assert archivable("000000010000000000000003.partial")
    assert archivable("00000002.history")
    assert not archivable("00000002.history.partial")
    assert not archivable("pg_receivewal.lock")
    assert not archivable("000000010000000000000003.tmp")


def test_slot_names_are_valid_for_postgresql() -> None:
    assert slot_name("crm-eu") == "deskvault_crm_eu"


def test_a_history_file_lists_each_ancestor_and_where_it_ended() -> None:
    text = "1\t0/3000148\tno recovery target specified\n\n2\t1/A0000000\tbefore 2026-12-03 17:00:00+00\n"
    assert parse_history(text) == [Switch(1, 0x3000148), Switch(2, (1 << 32) | 0xA0000000)]


def test_a_receiver_that_exits_is_reported_with_its_own_error_not_the_disconnect() -> None:
    streamer = WalStreamer(
        TargetSettings(name="main", engine="postgresql", conninfo="host=x"), None, Path("/")
    )
    streamer._proc = subprocess.Popen(["false"])
    streamer._proc.wait()
    streamer._errors = [
        "requested starting point 0/F0000000 is ahead of the WAL flush position",
        "disconnected",
    ]

    streamer._receiver_exited(backoff=1.0)

    assert streamer._problem == (
        "pg_receivewal exited (code 1): "
        "requested starting point 0/F0000000 is ahead of the WAL flush position"
    )
    assert streamer._proc is None
