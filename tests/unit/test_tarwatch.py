"""Keeping one tar member from a stream split anywhere."""

from __future__ import annotations

import io
import tarfile

from hypothesis import given
from hypothesis import strategies as st

from workers.engines.postgresql.tarwatch import TarMemberWatcher


def archive(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


MEMBERS = {
    "base/1/1259": b"x" * 8192,
    "global/pg_control": b"\x01" * 333,
    "backup_manifest": b'{"PostgreSQL-Backup-Manifest-Version": 1, "Files": []}' * 20,
    "pg_wal/000000010000000000000003": b"w" * 1000,
}


@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_the_member_is_kept_however_the_stream_is_split(cuts: list[int]) -> None:
    data = archive(MEMBERS)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(data[pos : pos + cut])
        pos += cut
    chunks.append(data[pos:])
    watcher = TarMemberWatcher("backup_manifest")

    assert b"".join(watcher.tee(chunks)) == data  # the stream passes through untouched
    assert watcher.captured == MEMBERS["backup_manifest"]


def test_a_missing_member_leaves_nothing_captured() -> None:
    watcher = TarMemberWatcher("backup_manifest")
    watcher.feed(archive({"a": b"1", "b": b""}))
    assert watcher.captured is None
