"""PostgreSQL backup archives against an attacker who can write validly encrypted objects (a stolen
key, or a bug in what wrote them): nothing of a restore lands outside the data directory and its
tablespaces, no device is made, and what is unpacked belongs to the server's user alone. Real
SeaweedFS, real GNU tar; the restore runs as root, as it would on a restore host."""

from __future__ import annotations

import io
import os
import pwd
import stat
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from support import worker_context

from workers.engines.postgresql.basebackup import object_entry, restore_full
from workers.engines.postgresql.cluster import server_user
from workers.engines.postgresql.diff import apply_diff
from workers.engines.postgresql.tablespaces import Tablespace
from workers.engines.postgresql.targuard import UnsafeMember

pytestmark = pytest.mark.integration


def _tar(*members: tuple[str, bytes, bytes, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, 0o644
            if kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[str, bytes, bytes, str]:
    return name, tarfile.REGTYPE, data, ""


@pytest.fixture
def repo(make_settings):
    return worker_context(make_settings()).repository


def _full(repo, archive: bytes) -> dict:
    """A full backup's manifest whose base.tar is `archive`, encrypted and stored like any other."""
    backup_id = f"crafted-{uuid.uuid4().hex[:8]}"
    stored = repo.put_stream(f"targets/crafted/{backup_id}/base.tar.dv", [archive])
    return {"backup_id": backup_id, "kind": "full", "objects": [object_entry("base.tar", stored)]}


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """The restore folder, and a folder beside it that must stay untouched."""
    (tmp_path / "outside").mkdir()
    return tmp_path / "restored" / "data", tmp_path / "outside"


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_file("../../outside/cron-job"), "a name with '..'"),
        (_file("/tmp/deskvault-evil"), "an absolute name"),
        (("dev-null", tarfile.CHRTYPE, b"", ""), "a device"),
        (("base/escape", tarfile.SYMTYPE, b"", "../../outside"), "a symbolic link"),
        (("pg_tblspc/16385", tarfile.SYMTYPE, b"", "/etc"), "where PostgreSQL puts none"),
        (("global/hard", tarfile.LNKTYPE, b"", "/etc/shadow"), "a hard link"),
    ],
)
def test_a_crafted_full_is_refused_naming_the_member_and_nothing_is_left(repo, places, member, why) -> None:
    into, outside = places
    manifest = _full(repo, _tar(_file("PG_VERSION", b"15\n"), member, _file("global/pg_control")))
    with pytest.raises(UnsafeMember) as refused:
        restore_full(repo, manifest, into, spaces=[])
    assert f"backup archive {manifest['backup_id']}/base.tar: member {member[0]!r}" in str(refused.value)
    assert why in str(refused.value)
    assert not into.exists()  # the half-restored folder is gone
    assert list(outside.iterdir()) == [] and not Path("/tmp/deskvault-evil").exists()


def test_a_link_chain_through_a_tablespace_link_is_refused(repo, places) -> None:
    into, outside = places
    # A link PostgreSQL may make, then a member written through it
    archive = _tar(("pg_tblspc/16385", tarfile.SYMTYPE, b"", str(outside)), _file("pg_tblspc/16385/owned"))
    space = Tablespace(16385, "space", "/srv/space", into.parent / "space")
    with pytest.raises(UnsafeMember, match="a member beneath the link pg_tblspc/16385"):
        restore_full(repo, _full(repo, archive), into, spaces=[space])
    assert list(outside.iterdir()) == []


def test_a_full_unpacks_as_the_servers_user_and_no_one_else_can_read_it(repo, places) -> None:
    into, _ = places
    folder = ("base", tarfile.DIRTYPE, b"", "")
    archive = _tar(_file("PG_VERSION", b"15\n"), folder, _file("base/1", b"r" * 9000))
    restore_full(repo, _full(repo, archive), into, spaces=[])
    owner = pwd.getpwnam(server_user()).pw_uid if server_user() else os.geteuid()
    for path in (into, into / "base", into / "PG_VERSION", into / "base" / "1"):
        info = path.lstat()
        assert info.st_uid == owner
        assert stat.S_IMODE(info.st_mode) in (0o700, 0o600), f"{path}: {oct(info.st_mode)}"
    if os.geteuid() == 0:  # nobody, a local user with a shell, can read none of it
        read = subprocess.run(
            ["runuser", "-u", "nobody", "--", "cat", str(into / "base" / "1")], capture_output=True
        )
        assert read.returncode != 0 and b"Permission denied" in read.stderr


@pytest.mark.parametrize("deleted", ["../../outside/keep", "/etc/hostname", "base/../../../outside/keep"])
def test_a_differential_cannot_delete_outside_the_data_directory(repo, places, deleted) -> None:
    into, outside = places
    (outside / "keep").write_text("precious")
    restore_full(repo, _full(repo, _tar(_file("PG_VERSION", b"15\n"))), into, spaces=[])
    stored = repo.put_stream(f"targets/crafted/d-{uuid.uuid4().hex[:8]}/changed.tar.dv", [_tar(_file("a"))])
    diff = {
        "backup_id": "crafted-diff",
        "objects": [object_entry("changed.tar", stored)],
        "deleted_files": [deleted],
        "backup_label": "",
    }
    with pytest.raises(UnsafeMember, match=r"differential crafted-diff: deleted file: .* not a path inside"):
        apply_diff(repo, diff, into)
    assert (outside / "keep").read_text() == "precious"
    assert Path("/etc/hostname").exists()
