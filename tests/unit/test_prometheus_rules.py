"""The alert rules and scrape config pass promtool, and only use metrics deskvault exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import exported_metric_names

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run ops/local/bootstrap.sh (Debian package prometheus)")
    return subprocess.run([binary, *args], cwd=OPS, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_passes(args) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_metric_an_alert_uses_is_exported() -> None:
    exported = exported_metric_names()
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in re.findall(r"\bdeskvault_[a-z_]+", rule["expr"])}
    assert used, "no deskvault metric in the alert rules"
    assert used <= exported, f"alerts use metrics deskvault does not export: {sorted(used - exported)}"
