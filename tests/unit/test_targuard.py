"""TarGuard reads every member header of a backup archive as tar would, and refuses whatever could
write outside the restore before tar gets the bytes that hold it."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator

import pytest

from workers.engines.postgresql.targuard import TarGuard, UnsafeMember, checked_path


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o600
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


LEGIT = [
    _member("PG_VERSION", data=b"15\n"),
    _member("base", tarfile.DIRTYPE),
    _member("base/1/16384", data=os.urandom(9000)),
    _member("pg_wal/" + "x" * 150, data=b"long name"),  # a GNU long name or pax path
    _member("pg_tblspc/16385", tarfile.SYMTYPE, link="/srv/space"),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("piece", [1, 511, 512, 4096, 1 << 20])
def test_a_backup_as_postgresql_writes_it_passes_unchanged_however_it_is_cut(fmt, piece) -> None:
    members = LEGIT if fmt != tarfile.USTAR_FORMAT else [m for m in LEGIT if len(m[0].name) < 100]
    archive = _tar(members, fmt)
    guard = TarGuard("base.tar", {"pg_tblspc/16385"}.__contains__)
    assert b"".join(guard(_pieces(archive, piece))) == archive


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("../../etc/cron.d/evil", data=b"* * * * * root sh"), "a name with '..'"),
        (_member("base/../../../root/.ssh/authorized_keys"), "a name with '..'"),
        (_member("/etc/passwd"), "an absolute name"),
        (_member("x" * 120 + "/../../../../escape"), "a name with '..'"),  # through a long name
        (_member("dev/sda", tarfile.CHRTYPE), "a device"),
        (_member("dev/loop0", tarfile.BLKTYPE), "a device"),
        (_member("pipe", tarfile.FIFOTYPE), "a FIFO"),
        (_member("hard", tarfile.LNKTYPE, link="/etc/shadow"), "a hard link"),
        (_member("base/1/link", tarfile.SYMTYPE, link="/etc"), "a symbolic link (to '/etc')"),
        (_member("pg_tblspc/99999", tarfile.SYMTYPE, link="/etc"), "where PostgreSQL puts none"),
        (_member(".", tarfile.REGTYPE), "a name for the restore folder itself"),
    ],
)
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_member_that_could_escape_is_refused_before_tar_gets_its_header(member, why, fmt) -> None:
    archive = _tar([_member("PG_VERSION", data=b"15\n"), member], fmt)
    guard = TarGuard("20261204T000000Z/base.tar", {"pg_tblspc/16385"}.__contains__)
    passed = []
    with pytest.raises(UnsafeMember) as refused:
        for chunk in guard(_pieces(archive, 512)):
            passed.append(chunk)
    assert f"backup archive 20261204T000000Z/base.tar: member {member[0].name!r}" in str(refused.value)
    assert why in str(refused.value)
    # Nothing from the refused member's own header on reached tar
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        header_at = tar.getmembers()[-1].offset_data - tarfile.BLOCKSIZE
    assert len(b"".join(passed)) <= header_at


def test_nothing_may_be_written_beneath_a_link_the_archive_made() -> None:
    archive = _tar(
        [
            _member("pg_tblspc/16385", tarfile.SYMTYPE, link="/etc"),
            _member("pg_tblspc/16385/cron.d/evil", data=b"x"),
        ]
    )
    with pytest.raises(UnsafeMember, match="a member beneath the link pg_tblspc/16385"):
        list(TarGuard("base.tar", {"pg_tblspc/16385"}.__contains__)([archive]))


def test_a_pax_header_cannot_hide_a_name_or_smuggle_a_key() -> None:
    info, data = _member("harmless", data=b"x")
    info.pax_headers = {"path": "../escape"}
    with pytest.raises(UnsafeMember, match=r"member '../escape' .*'\.\.'"):
        list(TarGuard("diff.tar")([_tar([(info, data)], tarfile.PAX_FORMAT)]))
    info.pax_headers = {"GNU.sparse.map": "0,1"}
    with pytest.raises(UnsafeMember, match=r"the pax key 'GNU\.sparse\.map'"):
        list(TarGuard("diff.tar")([_tar([(info, data)], tarfile.PAX_FORMAT)]))


def test_a_folder_or_link_that_carries_data_is_refused_so_no_reading_can_disagree() -> None:
    header = bytearray(tarfile.TarInfo("base").tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.DIRTYPE
    header[124:136] = b"%011o\0" % 512
    with pytest.raises(UnsafeMember, match="a folder or link that carries data"):
        list(TarGuard("base.tar")([bytes(header) + bytes(512 + 1024)]))


def test_after_the_end_of_the_archive_nothing_more_is_read_as_members() -> None:
    archive = _tar([_member("a", data=b"x")]) + _tar([_member("/etc/passwd")])
    assert b"".join(TarGuard("base.tar")([archive])) == archive  # tar stops at the first end, too


@pytest.mark.parametrize("path", ["../pg_hba.conf", "/etc/passwd", "base/../../x", "", "."])
def test_a_deleted_file_outside_the_data_directory_is_refused(path) -> None:
    with pytest.raises(UnsafeMember, match="is not a path inside the data directory"):
        checked_path(path, "differential d1: deleted file")
    assert checked_path("base/1/./16384", "deleted file") == "base/1/16384"
