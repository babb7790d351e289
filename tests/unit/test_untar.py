"""unpack_tar: GNU tar writes the files, private to the server's user; the stream is always read to its
end; failures are named."""

from __future__ import annotations

import io
import os
import pwd
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.engines.postgresql.cluster import server_user
from workers.engines.postgresql.targuard import TarGuard, UnsafeMember
from workers.engines.postgresql.untar import UnpackError, unpack_tar


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_files_and_times_are_unpacked_private_to_the_servers_user(tmp_path: Path) -> None:
    files = {"base/1/16384": (os.urandom(300_000), 0o600), "PG_VERSION": (b"15\n", 0o644)}
    unpack_tar(_pieces(_tar(files), 7_000), tmp_path, TarGuard("test.tar"))
    owner = pwd.getpwnam(server_user()).pw_uid if server_user() else os.geteuid()
    for name, (data, _mode) in files.items():
        assert (tmp_path / name).read_bytes() == data
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600  # whatever the archive said
        assert (tmp_path / name).stat().st_uid == owner
        assert (tmp_path / name).stat().st_mtime == 1_700_000_000
    assert (tmp_path / "base").stat().st_mode & 0o777 == 0o700


def test_the_stream_is_read_to_its_end_after_the_archive(tmp_path: Path) -> None:
    consumed = []

    def stream() -> Iterator[bytes]:
        yield _tar({"a": (b"x", 0o600)})
        yield bytes(1_000_000)  # padding after the end-of-archive blocks, which tar may not read
        consumed.append(True)

    unpack_tar(stream(), tmp_path, TarGuard("test.tar"))
    assert consumed == [True]


def test_an_error_in_the_stream_propagates(tmp_path: Path) -> None:
    def stream() -> Iterator[bytes]:
        yield _tar({"a": (b"x" * 5000, 0o600)})[:2048]
        raise RuntimeError("frame 3 failed authentication")

    with pytest.raises(RuntimeError, match="frame 3"):
        unpack_tar(stream(), tmp_path, TarGuard("test.tar"))


def test_garbage_is_refused_before_tar_sees_it(tmp_path: Path) -> None:
    with pytest.raises(UnsafeMember, match=r"backup archive test.tar: .* \(a size that is not a number\)"):
        unpack_tar([b"this is not a tar archive" * 100], tmp_path, TarGuard("test.tar"))


def test_what_tar_refuses_is_named_with_what_tar_said(tmp_path: Path) -> None:
    damaged = bytearray(_tar({"a": (b"x" * 5000, 0o600)}))
    damaged[148:156] = b"0000000\0"  # a wrong header checksum: the guard reads on, tar does not
    with pytest.raises(UnpackError, match=r"tar could not unpack the backup into .* \(exit 2\)"):
        unpack_tar([bytes(damaged)], tmp_path, TarGuard("test.tar"))
