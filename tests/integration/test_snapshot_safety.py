"""File snapshots against an attacker: setuid files, links swapped in while a tree is walked or
restored, and validly encrypted manifests naming places outside the restore folder. Real files,
real SeaweedFS; the restores run as root, as they would on a restore host."""

from __future__ import annotations

import logging
import os
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import worker_context

from workers.servers import filetrees, tree_restore
from workers.servers.tree_restore import UnsafeEntry

pytestmark = pytest.mark.integration

NOBODY = 65534


@pytest.fixture
def server(make_settings, tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    name = f"safe-{uuid.uuid4().hex[:8]}"
    settings = make_settings(extra=f'[servers.{name}]\ndriver = "files"\npaths = ["{root}"]\n')
    return worker_context(settings).repository, name, root


def take(repo, name: str, root: Path) -> dict:
    manifest, _ = filetrees.take_snapshot(
        repo, name, (str(root),), snapshot_id=f"s{uuid.uuid4().hex[:8]}", extra={}
    )
    return manifest


def test_a_setuid_file_comes_back_without_its_bits_unless_its_owner_does(server, tmp_path) -> None:
    repo, name, root = server
    # Given a setuid and a setgid program owned by nobody, beside an ordinary file
    for program, bits in (("su-like", stat.S_ISUID), ("sg-like", stat.S_ISGID)):
        (root / program).write_bytes(b"#!/bin/sh\nid\n")
        os.chown(root / program, NOBODY, NOBODY)
        os.chmod(root / program, 0o755 | bits)
    (root / "notes.txt").write_text("plain")
    manifest = take(repo, name, root)

    # When it is restored by root without --owners, then no file is setuid or setgid, and all are root's
    plain = tmp_path / "plain"
    tree_restore.restore_snapshot(repo, manifest, plain)
    restored = plain / str(root).lstrip("/")
    for program in ("su-like", "sg-like"):
        info = (restored / program).stat()
        assert stat.S_IMODE(info.st_mode) == 0o755 and info.st_uid == 0
    assert (restored / "notes.txt").read_text() == "plain"

    # And with --owners each gets its owner back, and only then its bits
    owned = tmp_path / "owned"
    tree_restore.restore_snapshot(repo, manifest, owned, owners=True)
    restored = owned / str(root).lstrip("/")
    assert stat.S_IMODE((restored / "su-like").stat().st_mode) == 0o4755
    assert stat.S_IMODE((restored / "sg-like").stat().st_mode) == 0o2755
    assert (restored / "su-like").stat().st_uid == NOBODY


def test_a_folder_swapped_for_a_link_while_walked_is_skipped_never_followed(server, tmp_path, caplog) -> None:
    *_, root = server
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow").write_text("root:$6$hash")
    (root / "a").mkdir()
    (root / "a" / "inner.txt").write_text("a")
    (root / "b").mkdir()
    (root / "b" / "file.txt").write_text("b")
    (root / "c.txt").write_text("c")

    # Given a walk that has listed the folder `b` and the file `c.txt`, but opened neither yet
    walk = filetrees._walk(root)
    seen = []
    for path, info, folder, entry in walk:
        seen.append(path.name)
        if path.name == "c.txt":
            # When an attacker swaps both for links to the secret (what the walk listed stays as it was)
            os.rename(root / "b", tmp_path / "b-moved")
            os.symlink(secret, root / "b")
            os.rename(root / "c.txt", tmp_path / "c-moved")
            os.symlink(secret / "shadow", root / "c.txt")
            with caplog.at_level(logging.WARNING, logger=filetrees.__name__):
                assert filetrees._open_file(folder, entry, info, path) is None  # not the file listed
            break
    with caplog.at_level(logging.WARNING, logger=filetrees.__name__):
        seen += [path.name for path, *_ in walk]

    # Then nothing of the secret is walked, and both swaps are named in a warning
    assert "shadow" not in seen and "file.txt" not in seen and "inner.txt" in seen
    warned = [r.getMessage() for r in caplog.records if "changed while the snapshot walked" in r.getMessage()]
    assert any(w.startswith(f"{root / 'b'} ") for w in warned)
    assert any(w.startswith(f"{root / 'c.txt'} ") for w in warned)


def test_links_in_the_tree_are_stored_and_restored_as_links_after_everything_else(server, tmp_path) -> None:
    repo, name, root = server
    (tmp_path / "outside").mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(os.urandom(4096))
    os.symlink("sub", root / "to-sub")
    os.symlink(tmp_path / "outside", root / "to-outside")
    os.chmod(root / "sub", 0o555)  # a read-only folder still gets its files
    manifest = take(repo, name, root)
    # (listed in walk order: the links come before the folder's file; the restore makes them last)
    names = [e["path"] for e in manifest["entries"]]
    assert names.index("to-sub") < names.index("sub/data.bin")

    into = tmp_path / "restored"
    tree_restore.restore_snapshot(repo, manifest, into)

    restored = into / str(root).lstrip("/")
    assert os.readlink(restored / "to-sub") == "sub"
    assert os.readlink(restored / "to-outside") == str(tmp_path / "outside")
    assert (restored / "sub" / "data.bin").read_bytes() == (root / "sub" / "data.bin").read_bytes()
    assert stat.S_IMODE((restored / "sub").stat().st_mode) == 0o555
    assert list((tmp_path / "outside").iterdir()) == []


def _crafted(repo, name: str, root: Path, entries: list[dict]) -> dict:
    """A manifest written with the repository's own keys: valid, authenticated, and hostile."""
    snapshot_id = f"c{uuid.uuid4().hex[:8]}"
    base = {"root": str(root), "mode": 0o644, "mtime_ns": 0, "size": 0}
    manifest = {
        "format": 1,
        "server": name,
        "snapshot_id": snapshot_id,
        "driver": "files",
        "roots": [str(root)],
        "finished_at": datetime.now(UTC).isoformat(),
        "entries": [{**base, "type": "file", "chunks": [], **entry} for entry in entries],
    }
    repo.commit_json(filetrees.manifest_key(name, snapshot_id), manifest)
    (found,) = [m for m in filetrees.list_snapshots(repo, name) if m["snapshot_id"] == snapshot_id]
    return found


@pytest.mark.parametrize(
    ("entries", "named", "why"),
    [
        ([{"path": "../../../escape"}], "escape", "'..' in a path is refused"),
        ([{"path": "/etc/cron.d/evil"}], "/etc/cron.d/evil", "an absolute path is refused"),
        ([{"path": "ok/../../up"}], "ok/../../up", "'..' in a path is refused"),
        ([{"path": "a//b"}], "a//b", "'' in a path is refused"),
        ([{"root": "../../x", "path": "f"}], "../../x/f", "its root must be an absolute path"),
        (
            [{"path": "link", "type": "symlink", "target": "/etc"}, {"path": "link/cron.d"}],
            "link",
            "a symlink with entries beneath it",
        ),
        (
            [{"path": "l1", "type": "symlink", "target": "l2"}, {"path": "l1/x", "type": "dir"}],
            "l1",
            "a symlink with entries beneath it",
        ),
        ([{"path": "twice"}, {"path": "twice"}], "twice", "listed twice"),
        ([{"path": "dev", "type": "chardev"}], "dev", "type 'chardev' is not restorable"),
    ],
)
def test_a_crafted_manifest_is_refused_naming_the_entry_before_anything_is_written(
    server, tmp_path, entries, named, why
) -> None:
    repo, name, root = server
    manifest = _crafted(repo, name, root, entries)
    parent = tmp_path / "into"
    parent.mkdir()
    with pytest.raises(UnsafeEntry) as refused:
        tree_restore.restore_snapshot(repo, manifest, parent / "restored")
    assert named in str(refused.value) and why in str(refused.value)
    assert list(parent.iterdir()) == []  # refused before even the folder was made


def test_a_folder_swapped_for_a_link_during_a_restore_is_refused_never_written_through(
    server, tmp_path, monkeypatch
) -> None:
    repo, name, root = server
    (root / "first").write_bytes(b"1" * 1000)
    (root / "later").mkdir()
    (root / "later" / "payload").write_bytes(b"2" * 1000)
    manifest = take(repo, name, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    into = tmp_path / "restored"
    restored = into / str(root).lstrip("/")

    # Given a restore during whose first download someone replaces the folder `later` with a link
    fetch = tree_restore._get_chunk

    def swap_then_fetch(*args):
        if (restored / "later").is_dir() and not (restored / "later").is_symlink():
            (restored / "later").rmdir()
            os.symlink(outside, restored / "later")
        return fetch(*args)

    monkeypatch.setattr(tree_restore, "_get_chunk", swap_then_fetch)

    # Then the file that was to go in it is refused, and nothing is written through the link
    with pytest.raises(UnsafeEntry, match=r"later/payload: refused \(a link or a file is in its way\)"):
        tree_restore.restore_snapshot(repo, manifest, into)
    assert list(outside.iterdir()) == []
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700  # folders stay closed until the end
