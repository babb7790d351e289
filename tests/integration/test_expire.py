"""Retention against a real repository: old chains go, the kept window stays, stale uploads are aborted."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import worker_context

from messages.events import BackupDue
from workers.backups.expire import expire
from workers.handlers.backup import handle_backup_due
from workers.repository import catalog

pytestmark = pytest.mark.integration


def test_expire_keeps_the_policy_window_and_deletes_the_rest(make_settings) -> None:
    # Given three fulls of one target, a stale multipart upload, and a policy that keeps one full
    settings = make_settings()
    ctx = worker_context(settings)
    for day in (1, 8, 15):
        event = BackupDue.new(
            target="main",
            kind="full",
            slot=datetime(2026, 11, day, 1, tzinfo=UTC),
            idempotency_key=f"expire-{uuid.uuid4().hex}",
        )
        assert handle_backup_due(ctx, event).startswith("full backup ")
    store = ctx.repository.store
    store.client.create_multipart_upload(
        Bucket=store.bucket, Key=store.prefix + "targets/main/backups/x/y.dv"
    )
    target = dataclasses.replace(
        settings.target("main"), retention_full_count=1, retention_full_max_age_days=0
    )
    later = datetime.now(UTC) + timedelta(days=2)  # makes the upload above a day old

    # When a dry run is asked for, then nothing is deleted but everything to go is named
    dry = expire(ctx.repository, target, later, dry_run=True)
    assert len(catalog.list_manifests(ctx.repository, "main")) == 3
    text = "\n".join(dry.lines)
    assert "20261101T010000Z-full" in text and "20261108T010000Z-full" in text
    assert "would abort multipart upload" in text

    # When it runs for real, then only the newest full is left, complete, and the upload is aborted
    done = expire(ctx.repository, target, later, dry_run=False)
    assert done.aborted_uploads == 1
    remaining = catalog.list_manifests(ctx.repository, "main")
    assert [m["backup_id"] for m in remaining] == ["20261115T010000Z-full"]
    assert all(
        k.startswith("targets/main/backups/20261115T010000Z-full/")
        for k in ctx.repository.list_keys("targets/main/backups/")
    )
    assert (
        store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", []) == []
    )
