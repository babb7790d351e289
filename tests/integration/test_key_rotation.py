"""Rotating the key-encryption key: new objects use the new key, every older backup still restores, and
a missing key is named."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import raw_s3, run_cli, worker_context

from messages.events import BackupDue
from workers.engines.postgresql.basebackup import restore_full
from workers.handlers.backup import handle_backup_due
from workers.repository import catalog
from workers.repository.crypto import header_key_id
from workers.repository.errors import KeyNotFound
from workers.repository.keyring import Keyring

pytestmark = pytest.mark.integration


def _full_backup(settings, slot: datetime) -> dict:
    ctx = worker_context(settings)  # a worker started now: it loads the key file as it is now
    event = BackupDue.new(target="main", kind="full", slot=slot, idempotency_key=f"rot-{uuid.uuid4().hex}")
    assert handle_backup_due(ctx, event).startswith("full backup ")
    return catalog.newest_full(ctx.repository, "main", catalog.backup_id_for("full", slot))


def _key_of(settings, key: str) -> str:
    r = settings.repository
    head = raw_s3(settings).get_object(Bucket=r.bucket, Key=r.prefix + key, Range="bytes=0-99")["Body"].read()
    return header_key_id(head)


def test_rotation_keeps_old_backups_restorable_and_a_missing_key_is_named(
    make_settings, key_file: Path, scratch_dir: Path
) -> None:
    settings = make_settings()
    old_id = Keyring.load(key_file).active_id
    slot = datetime.now(UTC).replace(second=0, microsecond=0)
    before = _full_backup(settings, slot - timedelta(minutes=1))

    # When the key-encryption key is rotated
    rotated = run_cli(settings, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_id = Keyring.load(key_file).active_id
    assert new_id != old_id and new_id in rotated.stdout
    after = _full_backup(settings, slot)

    # Then the new backup's objects name the new key, the old one's the old key
    assert {_key_of(settings, o["key"]) for o in before["objects"]} == {old_id}
    assert {_key_of(settings, o["key"]) for o in after["objects"]} == {new_id}
    assert _key_of(settings, catalog.manifest_key("main", after["backup_id"])) == new_id
    # And both restore with the rotated key file
    repo = worker_context(settings).repository
    for manifest in (before, after):
        into = scratch_dir / f"rotated-{uuid.uuid4().hex[:6]}"
        restore_full(repo, manifest, into)
        assert (into / "PG_VERSION").exists()

    # When the old key is lost from the key file
    document = json.loads(key_file.read_text())
    del document["keys"][old_id]
    key_file.write_text(json.dumps(document))
    repo = worker_context(settings).repository

    # Then restoring the old backup fails naming the missing key, and the new one still restores
    into = scratch_dir / f"lost-key-{uuid.uuid4().hex[:6]}"
    with pytest.raises(KeyNotFound, match=old_id):
        restore_full(repo, before, into)
    assert not into.exists()
    restore_full(repo, after, scratch_dir / f"kept-key-{uuid.uuid4().hex[:6]}")
