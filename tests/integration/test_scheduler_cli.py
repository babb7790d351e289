"""`deskvault scheduler --once --json` as a cron job or a script runs it: what it published, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import build_settings, rabbit_vhost, run_cli, scratch_database

pytestmark = pytest.mark.integration


def test_scheduler_once_prints_what_it_published_and_a_second_run_publishes_nothing(
    tmp_path: Path, s3_endpoint, pg_target
) -> None:
    # Given a new deployment: a broker vhost and a control database of its own, one target, and no key
    # file (the scheduler reads no backup: its pods are given none)
    no_key_file = tmp_path / "absent-keys.json"
    with rabbit_vhost("deskvault-sched") as broker, scratch_database() as control:
        settings = build_settings(tmp_path, no_key_file, s3_endpoint, broker, control, pg_target)

        # When the scheduler runs once, then it prints every event it published as JSON
        first = run_cli(settings, "scheduler", "--once", "--json")
        assert first.returncode == 0, first.stdout + first.stderr
        published = json.loads(first.stdout)["published"]
        due = {(e["type"], e.get("kind")) for e in published if e.get("target") == "main"}
        assert {("backup-due", "full"), ("backup-due", "diff"), ("backup-due", "log")} <= due
        assert ("restore-drill", None) in due
        assert all(e["idempotency_key"] and e["event_id"] for e in published)

        # And run again within the same slots, it publishes nothing more (the slots are marked)
        second = run_cli(settings, "scheduler", "--once", "--json")
        assert second.returncode == 0, second.stdout + second.stderr
        assert json.loads(second.stdout) == {"published": []}
