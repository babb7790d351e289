"""Which events the scheduler considers due: the newest slot per kind, with deterministic keys."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from deskvault_core.config import load_settings
from producers.scheduler import due_now


def settings(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[targets.main]\nengine='postgresql'\nconninfo='host=x'\n"
        "[targets.fast]\nengine='postgresql'\nconninfo='host=y'\n"
        "[targets.fast.schedule]\ndiff='*/15 * * * *'\n"
        "[servers.app1]\n"
    )
    return load_settings(path, env={})


def test_defaults_give_the_newest_slot_of_each_kind(tmp_path: Path) -> None:
    # Given Saturday 2026-11-28 10:47 UTC
    now = datetime(2026, 11, 28, 10, 47, 12, tzinfo=UTC)
    due = {(d.subject, d.kind): d for d in due_now(settings(tmp_path), now)}
    assert due[("target:main", "full")].slot == datetime(2026, 11, 22, 1, 0, tzinfo=UTC)  # last Sunday 01:00
    assert due[("target:main", "diff")].slot == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert due[("target:main", "log")].slot == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert due[("target:fast", "diff")].slot == datetime(2026, 11, 28, 10, 45, tzinfo=UTC)
    assert due[("server:app1", "snapshot")].slot == datetime(2026, 11, 28, 3, 0, tzinfo=UTC)


def test_keys_depend_only_on_target_kind_and_slot(tmp_path: Path) -> None:
    s = settings(tmp_path)
    a = {d.event.idempotency_key for d in due_now(s, datetime(2026, 11, 28, 10, 1, tzinfo=UTC))}
    b = {d.event.idempotency_key for d in due_now(s, datetime(2026, 11, 28, 10, 14, 59, tzinfo=UTC))}
    assert a == b  # two schedulers, or one restarted, agree on every key
    assert "backup-due:main:full:2026-11-22T01:00Z" in a
    assert "snapshot-due:app1:2026-11-28T03:00Z" in a
