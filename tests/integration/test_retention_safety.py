"""Retention never deletes what it cannot read: a worker with the wrong key file, a damaged manifest or a
manifest the bucket fails to serve stops expiry for the target, and every backup stays restorable."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import raw_s3, restore_and_query, run_cli, worker_context

from deskvault_core.config import Settings, load_settings
from messages.events import BackupDue
from workers.backups.expire import expire
from workers.handlers.backup import handle_backup_due
from workers.repository import catalog
from workers.repository.errors import RepositoryError
from workers.repository.keyring import Keyring

pytestmark = pytest.mark.integration

SLOTS = [datetime(2026, 11, day, 1, tzinfo=UTC) for day in (1, 8, 15)]
KEEP_ONE = "retention_full_count = 1\nretention_full_max_age_days = 0\n"


def _fulls(settings: Settings) -> list[str]:
    ctx = worker_context(settings)
    for slot in SLOTS:
        event = BackupDue.new(
            target="main", kind="full", slot=slot, idempotency_key=f"retention-{uuid.uuid4().hex}"
        )
        assert handle_backup_due(ctx, event).startswith("full backup ")
    return [catalog.backup_id_for("full", s) for s in SLOTS]


def _variant(settings: Settings, tmp_path: Path, *, key_file: Path | None = None, keep_one: bool) -> Settings:
    """The same repository seen through another config: another key file, a policy that keeps one full."""
    text = Path(settings.source).read_text()
    if key_file is not None:
        text = text.replace(f'key_file = "{settings.repository.key_file}"', f'key_file = "{key_file}"')
        assert str(key_file) in text
    if keep_one:
        text = text.replace("[targets.main]\n", "[targets.main]\n" + KEEP_ONE)
    path = tmp_path / f"variant-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return load_settings(path, env={})


def _stored(settings: Settings) -> list[str]:
    r = settings.repository
    pages = raw_s3(settings).get_paginator("list_objects_v2").paginate(Bucket=r.bucket, Prefix=r.prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_a_worker_with_the_wrong_key_file_deletes_nothing_and_names_the_key(
    make_settings, tmp_path: Path, scratch_dir: Path
) -> None:
    # Given three committed fulls, and a second config whose key file lacks the key in use
    settings = make_settings()
    ids = _fulls(settings)
    key_in_use = worker_context(settings).repository.keyring.active_id
    stranger = _variant(settings, tmp_path, key_file=tmp_path / "other.key", keep_one=True)
    Keyring.create(stranger.repository.key_file)
    before = _stored(settings)

    # When retention runs with that config, as a dry run and for real
    for args in (("--dry-run",), ()):
        run = run_cli(stranger, "backups", "expire", "--target", "main", *args)
        # Then it fails naming the unreadable manifest and the key id, and deletes nothing
        said = run.stdout + run.stderr
        assert run.returncode != 0, said
        assert key_in_use in said and catalog.manifest_key("main", ids[0]) in said, said
        assert "deleted nothing" in said, said
        assert _stored(settings) == before
    # When it runs days later, when even fresh uploads are past the leftovers' grace period, the same
    later = datetime.now(UTC) + timedelta(days=3)
    with pytest.raises(RepositoryError, match=key_in_use):
        expire(worker_context(stranger).repository, stranger.target("main"), later, dry_run=False)
    assert _stored(settings) == before

    # Then, with the right key file, every backup is listed, verifies, and the newest restores
    listed = run_cli(settings, "backups", "list", "--target", "main", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(b["backup_id"] for b in json.loads(listed.stdout)["backups"]) == ids
    verified = run_cli(settings, "backups", "verify", "--target", "main")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    into = scratch_dir / f"retention-{uuid.uuid4().hex[:6]}"
    assert restore_and_query(settings, into, "SELECT count(*) FROM tickets", "acme") != "0"


def test_a_full_taken_with_the_wrong_key_file_leaves_older_backups_alone(
    make_settings, tmp_path: Path
) -> None:
    # Given three committed fulls, and a worker whose key file lacks the key in use
    settings = make_settings()
    ids = _fulls(settings)
    stranger = _variant(settings, tmp_path, key_file=tmp_path / "other.key", keep_one=True)
    Keyring.create(stranger.repository.key_file)
    before = _stored(settings)

    # When that worker takes a full (its own key encrypts it) and runs retention afterwards
    event = BackupDue.new(
        target="main",
        kind="full",
        slot=datetime(2026, 11, 22, 1, tzinfo=UTC),
        idempotency_key=f"retention-{uuid.uuid4().hex}",
    )
    outcome = handle_backup_due(worker_context(stranger), event)

    # Then the full is committed, retention says it stopped, and nothing older is gone
    assert outcome.startswith("full backup ") and "retention stopped, nothing deleted" in outcome, outcome
    after = _stored(settings)
    assert set(before) <= set(after)
    assert all(catalog.manifest_key("main", i) in "\n".join(after) for i in ids)


def test_a_damaged_manifest_stops_expiry_and_its_data_is_not_an_orphan(make_settings, tmp_path: Path) -> None:
    # Given three fulls under a keep-one policy, the oldest's manifest damaged in the bucket
    settings = make_settings()
    ids = _fulls(settings)
    keep_one = _variant(settings, tmp_path, keep_one=True)
    ctx = worker_context(keep_one)
    r = settings.repository
    damaged = catalog.manifest_key("main", ids[0])
    s3 = raw_s3(settings)
    body = bytearray(s3.get_object(Bucket=r.bucket, Key=r.prefix + damaged)["Body"].read())
    body[-5] ^= 0xFF
    s3.put_object(Bucket=r.bucket, Key=r.prefix + damaged, Body=bytes(body))
    before = _stored(settings)
    target = keep_one.target("main")
    later = datetime.now(UTC) + timedelta(days=3)  # past the leftovers' grace period

    # When retention runs (a dry run and for real), then it refuses, naming the damaged manifest
    for dry_run in (True, False):
        with pytest.raises(RepositoryError, match=damaged):
            expire(ctx.repository, target, later, dry_run=dry_run)
    assert _stored(settings) == before


def test_leftovers_are_only_objects_of_backups_with_no_manifest_at_all(make_settings, tmp_path: Path) -> None:
    # Given fulls whose manifests all read, and data of an attempt that never committed
    settings = make_settings()
    ids = _fulls(settings)
    ctx = worker_context(settings)
    never = "targets/main/backups/20261120T010000Z-full/base.tar.dv"
    ctx.repository.store.put_bytes(never, b"half an upload")
    target = settings.target("main")

    # When retention runs within the grace period, then the uncommitted data stays
    assert expire(ctx.repository, target, datetime.now(UTC), dry_run=False).orphans == 0
    # When it runs past the grace period, then only that data goes; every committed backup stays
    done = expire(ctx.repository, target, datetime.now(UTC) + timedelta(days=3), dry_run=False)
    assert done.orphans == 1
    keys = set(ctx.repository.list_keys("targets/main/backups/"))
    assert never not in keys
    assert {catalog.manifest_key("main", i) for i in ids} <= keys
