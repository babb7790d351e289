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


def test_every_panel_queries_the_data_source_variable() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert PANELS and all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in PANELS)
    assert all(t["datasource"]["uid"] == "${datasource}" for p in PANELS for t in p["targets"])
    # no data source is named anywhere else, so the dashboard holds in any Grafana
    assert "deskvault-prometheus" not in json.dumps(DASHBOARD)
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def _imported(dashboard: dict, chosen_uid: str) -> dict:
    """What Grafana's import does: each `${DS_...}` of `__inputs` replaced by the data source chosen."""
    text = json.dumps(dashboard)
    for given in dashboard["__inputs"]:
        assert given["type"] == "datasource" and given["pluginId"] == "prometheus"
        text = text.replace("${" + given["name"] + "}", chosen_uid)
    return json.loads(text)


def _resolve(uid: str, variables: dict) -> str:
    """A panel's data source uid as Grafana resolves it: a `${var}` reads that variable's value."""
    match = re.fullmatch(r"\$\{(\w+)\}", uid)
    return variables[match.group(1)]["current"]["value"] if match else uid


def test_imported_with_another_data_source_every_panel_resolves_to_it() -> None:
    imported = _imported(DASHBOARD, "prom-7Qx2")
    variables = {v["name"]: v for v in imported["templating"]["list"]}
    panels = [p for p in imported["panels"] if p["type"] != "row"]
    resolved = {_resolve(p["datasource"]["uid"], variables) for p in panels}
    resolved |= {_resolve(t["datasource"]["uid"], variables) for p in panels for t in p["targets"]}
    resolved |= {_resolve(v["datasource"]["uid"], variables) for v in variables.values() if "datasource" in v}
    assert resolved == {"prom-7Qx2"}
    assert "${DS_" not in json.dumps(imported)


def test_every_panel_of_a_target_or_pool_follows_its_variable() -> None:
    for panel in PANELS:
        for target in panel["targets"]:
            expr = target["expr"]
            grouped = {
                label.strip() for m in re.finditer(r"by \(([^)]*)\)", expr) for label in m[1].split(",")
            }
            for label in {"target", "pool"} & grouped:
                for selector in re.finditer(r"\bdeskvault_[a-z_]+(\{[^}]*\})?", expr):
                    assert f'{label}=~"${label}"' in (selector[1] or ""), (panel["title"], expr)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    for name in ("target", "pool"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"]["uid"] == "${datasource}"


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
                "rules": [{"record": f"q{i}", "expr": e.replace("$", "")} for i, e in enumerate(EXPRESSIONS)],
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
