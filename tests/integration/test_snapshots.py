"""File-tree snapshots for real: a 1 GiB tree on disk, SeaweedFS, restore byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import run_cli, worker_context

from messages.events import SnapshotDue
from workers.errors import PermanentError, UnknownTarget
from workers.handlers.snapshot import handle_snapshot_due
from workers.servers import filetrees, tree_restore

pytestmark = pytest.mark.integration

MIB = 2**20


def build_tree(root: Path, rng: random.Random) -> None:
    """About 1 GiB: 254 files of 4 MiB in nested folders, small and empty files, links, odd modes."""
    for i in range(254):
        folder = root / "attachments" / f"{i % 16:02d}" / f"{i // 16:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file-{i:03d}.bin").write_bytes(rng.randbytes(4 * MIB))
    config = root / "config"
    config.mkdir()
    (config / "helpdesk.conf").write_text("listen = 0.0.0.0:443\n")
    (config / "secret.key").write_bytes(rng.randbytes(300))
    (config / "secret.key").chmod(0o600)
    (config / "empty").write_bytes(b"")
    (config / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (config / "run.sh").chmod(0o755)
    (config / "current").symlink_to("helpdesk.conf")
    (root / "attachments" / "00").chmod(0o750)
    os.utime(config / "helpdesk.conf", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def change_one_percent(root: Path, rng: random.Random) -> int:
    """5 MiB of new attachments and 20 edits of 256 KiB inside existing files: 10 MiB, ~1 %."""
    changed = 0
    for i in range(4):
        (root / "attachments" / "new").mkdir(exist_ok=True)
        (root / "attachments" / "new" / f"upload-{i}.bin").write_bytes(rng.randbytes(1280 * 1024))
        changed += 1280 * 1024
    files = sorted((root / "attachments").glob("*/*/file-*.bin"))
    for path in rng.sample(files, 20):
        with path.open("r+b") as f:
            f.seek(rng.randrange(0, 4 * MIB - 256 * 1024))
            f.write(rng.randbytes(256 * 1024))
        changed += 256 * 1024
    return changed


def describe(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: type, mode, mtime and content hash or link target."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path), info.st_mtime_ns)
        elif path.is_dir():
            found[rel] = ("dir", info.st_mode & 0o7777, info.st_mtime_ns)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = ("file", info.st_mode & 0o7777, info.st_mtime_ns, digest)
    return found


@pytest.fixture
def files_server(make_settings, tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    name = f"app-{uuid.uuid4().hex[:8]}"
    settings = make_settings(extra=f'[servers.{name}]\ndriver = "files"\npaths = ["{root}"]\n')
    return worker_context(settings), name, root


def snapshot(ctx, server: str, slot: datetime) -> str:
    return handle_snapshot_due(ctx, SnapshotDue.new(server=server, slot=slot))


def test_a_second_snapshot_after_one_percent_changed_stores_little_and_both_restore_exactly(
    files_server, tmp_path
) -> None:
    ctx, server, root = files_server
    rng = random.Random(5)
    build_tree(root, rng)
    before = describe(root)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())

    first = snapshot(ctx, server, datetime(2026, 12, 1, 3, 0, tzinfo=UTC))
    assert first.startswith(f"snapshot 20261201T030000Z of {server}: 258 files")
    changed = change_one_percent(root, rng)
    after = describe(root)
    snapshot(ctx, server, datetime(2026, 12, 2, 3, 0, tzinfo=UTC))

    first_m, second_m = filetrees.list_snapshots(ctx.repository, server)
    assert 0.009 < changed / total < 0.011
    ratio = second_m["new_bytes"] / second_m["bytes"]
    print(
        f"\n1 % changed ({changed / MIB:.1f} MiB of {total / MIB:.0f} MiB): the second snapshot stored "
        f"{second_m['new_bytes'] / MIB:.1f} MiB new ({ratio:.2%}), reusing {second_m['reused_files']} files"
    )
    assert ratio <= 0.03
    assert first_m["new_bytes"] == first_m["bytes"]  # random data: nothing to share the first time

    for manifest, expected in ((first_m, before), (second_m, after)):
        into = tmp_path / f"restored-{manifest['snapshot_id']}"
        tree_restore.restore_snapshot(ctx.repository, manifest, into)
        assert describe(into / str(root).lstrip("/")) == expected


def test_a_redelivered_snapshot_due_takes_one_snapshot(files_server) -> None:
    ctx, server, root = files_server
    (root / "a.txt").write_text("a")
    slot = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)
    assert snapshot(ctx, server, slot).startswith("snapshot 20261203T030000Z")
    assert snapshot(ctx, server, slot) is None  # the same event: skipped as a duplicate
    again = handle_snapshot_due(
        ctx, SnapshotDue.new(server=server, slot=slot, idempotency_key=uuid.uuid4().hex)
    )
    assert again.startswith("snapshot (already taken) 20261203T030000Z")
    assert len(filetrees.list_snapshots(ctx.repository, server)) == 1


def test_an_unreadable_path_is_refused_and_nothing_is_recorded(make_settings, tmp_path) -> None:
    name = f"app-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "does-not-exist"
    ctx = worker_context(make_settings(extra=f'[servers.{name}]\ndriver = "files"\npaths = ["{missing}"]\n'))
    with pytest.raises(PermanentError, match=rf"paths: {missing} is not a readable directory"):
        snapshot(ctx, name, datetime(2026, 12, 3, 3, 0, tzinfo=UTC))
    assert filetrees.list_snapshots(ctx.repository, name) == []
    assert list(ctx.repository.list_keys(f"servers/{name}/")) == []


def test_unknown_servers_and_servers_without_a_driver_are_refused(make_settings) -> None:
    ctx = worker_context(make_settings(servers={"bare": "0 3 * * *"}))
    with pytest.raises(UnknownTarget, match="server: 'nowhere' is not configured"):
        snapshot(ctx, "nowhere", datetime(2026, 12, 3, 3, 0, tzinfo=UTC))
    with pytest.raises(PermanentError, match=r"servers\.bare\.driver: not set"):
        snapshot(ctx, "bare", datetime(2026, 12, 3, 3, 0, tzinfo=UTC))


def test_snapshots_list_and_restore_at_a_time_from_the_cli(files_server, tmp_path) -> None:
    ctx, server, root = files_server
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("version one")
    snapshot(ctx, server, datetime(2026, 12, 4, 3, 0, tzinfo=UTC))
    between = datetime.now(UTC)
    time.sleep(1.1)
    (root / "docs" / "a.txt").write_text("version two, longer")
    snapshot(ctx, server, datetime(2026, 12, 5, 3, 0, tzinfo=UTC))

    listed = run_cli(ctx.settings, "snapshots", "list", "--server", server, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [m["snapshot_id"] for m in json.loads(listed.stdout)] == ["20261204T030000Z", "20261205T030000Z"]

    into = tmp_path / "older"
    restored = run_cli(
        ctx.settings,
        "snapshots",
        "restore",
        "--server",
        server,
        "--into",
        str(into),
        "--at",
        f"{between:%Y-%m-%dT%H:%M:%S.%fZ}",
    )
    assert restored.returncode == 0, restored.stderr
    assert "restoring snapshot 20261204T030000Z" in restored.stdout
    assert (into / str(root).lstrip("/") / "docs" / "a.txt").read_text() == "version one"

    too_early = run_cli(
        ctx.settings,
        "snapshots",
        "restore",
        "--server",
        server,
        "--into",
        str(tmp_path / "x"),
        "--at",
        "2020-01-01T00:00:00Z",
    )
    assert too_early.returncode != 0
    assert "has no snapshot finished at or before 2020-01-01T00:00:00Z" in too_early.stderr
