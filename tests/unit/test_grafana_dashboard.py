"""The provisioned Grafana dashboard: valid PromQL, only metrics deskvault exports, one data source."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import exported_metric_names

GRAFANA = Path(__file__).resolve().parents[2] / "ops" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "deskvault.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
EXPRESSIONS = [t["expr"] for p in PANELS for t in p["targets"]]


def test_every_panel_queries_the_provisioned_data_source() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    assert PANELS and all(p["datasource"]["uid"] == uid for p in PANELS)
    assert all(t["datasource"]["uid"] == uid for p in PANELS for t in p["targets"])
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_a_panel_queries_is_exported() -> None:
    used = {name for expr in EXPRESSIONS for name in re.findall(r"\bdeskvault_[a-z_]+", expr)}
    assert used, "no deskvault metric on the dashboard"
    assert used <= exported_metric_names(), f"not exported: {sorted(used - exported_metric_names())}"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: each query becomes a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(EXPRESSIONS)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run ops/local/bootstrap.sh (Debian package prometheus)")
    result = subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPRESSIONS)} rules found" in result.stdout
