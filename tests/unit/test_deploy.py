"""ops/deploy agrees with the code and with Kubernetes: queue arguments, the CLI's flags, the stop
timeouts and grace periods, the Kubernetes schemas, the image's contents and the systemd hardening."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deskvault.cli import _parser
from deskvault_core.config import load_settings
from messages.topology import (
    DEFAULT_DELIVERY_LIMIT,
    POOLS,
    dead_letter_queue,
    dead_letter_queue_arguments,
    delay_queue,
    work_queue_arguments,
)
from workers.actors import TIME_LIMIT_MS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "ops" / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
# The rabbitmq scaler's metadata keys (KEDA's documentation).
RABBITMQ_TRIGGER_KEYS = {
    "host", "hostFromEnv", "protocol", "mode", "value", "activationValue", "queueName", "vhostName",
    "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
}  # fmt: skip


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _documents() if d["kind"] == kind}


def _workloads() -> dict[str, dict[str, Any]]:
    """Every object that runs pods, by name."""
    return {
        d["metadata"]["name"]: d for _, d in _documents() if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _config() -> dict[str, Any]:
    return tomllib.loads(_by_kind("ConfigMap")["deskvault-config"]["data"]["deskvault.toml"])


def test_rabbitmq_definitions_declare_queues_exactly_as_the_code_does() -> None:
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    declared = {q["name"]: q["arguments"] for q in definitions["queues"]}
    expected = {}
    for pool in POOLS:
        for name in (pool, delay_queue(pool)):
            expected[name] = work_queue_arguments(name, DEFAULT_DELIVERY_LIMIT)
        expected[dead_letter_queue(pool)] = dead_letter_queue_arguments()
    # RabbitMQ refuses a redeclaration whose arguments differ: these must match the code exactly.
    assert declared == expected
    assert all(u["password_hash"] == "" for u in definitions["users"])  # no secret in the repository


def test_every_kubernetes_object_validates_against_the_kubernetes_schemas() -> None:
    checked = 0
    for name, document in _documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: checked by the KEDA tests below
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name}: {document['kind']} {document['metadata']['name']}: {e}") from None
        checked += 1
    assert checked >= 12


def test_the_schema_check_refuses_an_unknown_field() -> None:
    (deployment,) = [d for _, d in _documents() if d["metadata"]["name"] == "deskvault-backup"][:1]
    broken = json.loads(json.dumps(deployment))
    _pod(broken)["containers"][0]["livenesProbe"] = _pod(broken)["containers"][0].pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_every_long_running_part_has_its_workload() -> None:
    workloads = _workloads()
    deployments, statefulsets = _by_kind("Deployment"), _by_kind("StatefulSet")
    assert set(deployments) == {f"deskvault-{p}" for p in POOLS} | {
        "deskvault-scheduler",
        "deskvault-downloads",
    }
    assert set(statefulsets) == {"deskvault-wal-stream"}
    commands = {name: _parser().parse_args(_pod(w)["containers"][0]["args"]) for name, w in workloads.items()}
    for pool in POOLS:
        assert commands[f"deskvault-{pool}"].pools == [pool]
    assert commands["deskvault-wal-stream"].command == "wal-stream"
    assert commands["deskvault-scheduler"].command == "scheduler"
    assert commands["deskvault-downloads"].command == "downloads"
    assert commands["deskvault-init"].command == "init"
    # Two schedulers, so one may die; exactly one WAL streamer, since it holds the replication slots.
    assert deployments["deskvault-scheduler"]["spec"]["replicas"] == 2
    assert statefulsets["deskvault-wal-stream"]["spec"]["replicas"] == 1


def test_every_container_runs_as_a_non_root_user_with_limits_and_nothing_to_gain() -> None:
    for name, workload in _workloads().items():
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name  # no pod calls the Kubernetes API
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "memory" in container["resources"]["limits"], where


def test_every_daemon_is_probed_on_a_port_it_serves() -> None:
    for name, workload in _workloads().items():
        if workload["kind"] == "Job":
            continue
        (container,) = _pod(workload)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in ports, f"{name}: {probe}"
        args = _parser().parse_args(container["args"])
        served = getattr(args, "metrics_port", None) or _config()["downloads"]["port"]
        assert served in ports.values(), name
    # The scheduler's probe is the endpoint that fails when it stops ticking
    (scheduler,) = _pod(_workloads()["deskvault-scheduler"])["containers"]
    assert scheduler["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_a_scale_down_waits_for_the_running_job_and_keda_scales_each_pool_on_its_queue() -> None:
    deployments = _by_kind("Deployment")
    scaled = _by_kind("ScaledObject")
    (auth,) = _by_kind("TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "deskvault-rabbitmq", "key": "host"}
    ]
    assert set(scaled) == {f"deskvault-{pool}" for pool in POOLS}
    for pool in POOLS:
        pod = _pod(deployments[f"deskvault-{pool}"])
        args = _parser().parse_args(pod["containers"][0]["args"])
        # A running event ends (done, or past its pool's time limit) before the stop gives up on it.
        assert args.stop_timeout * 1000 >= TIME_LIMIT_MS[pool], pool
        # Kubernetes kills the pod after its grace period: a running job must get its stop timeout first.
        assert pod["terminationGracePeriodSeconds"] > args.stop_timeout, pool
        spec = scaled[f"deskvault-{pool}"]["spec"]
        assert spec["scaleTargetRef"] == {"name": f"deskvault-{pool}"}
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert set(trigger["metadata"]) <= RABBITMQ_TRIGGER_KEYS
        assert trigger["metadata"]["queueName"] == pool
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        # KEDA hands `behavior` to the HPA it makes: it must be a valid HPA behavior, scaling down slowly.
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": f"keda-hpa-deskvault-{pool}"},
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": f"deskvault-{pool}",
                },
                "minReplicas": spec["minReplicaCount"],
                "maxReplicas": spec["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
        assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]


def test_the_config_loads_and_every_path_it_names_is_mounted_where_it_is_needed(tmp_path: Path) -> None:
    path = tmp_path / "deskvault.toml"
    path.write_text(_by_kind("ConfigMap")["deskvault-config"]["data"]["deskvault.toml"])
    settings = load_settings(path, env={})  # valid as it stands, secrets aside
    pools = [f"deskvault-{pool}" for pool in POOLS]
    needs = {
        settings.repository.key_file: [
            *pools,
            "deskvault-wal-stream",
            "deskvault-downloads",
            "deskvault-init",
        ],
        settings.wal.spool_dir: ["deskvault-wal-stream"],
        settings.downloads.tls_cert: ["deskvault-downloads"],
    }
    for wanted, names in needs.items():
        for name in names:
            mounts = [m["mountPath"] for m in _pod(_workloads()[name])["containers"][0]["volumeMounts"]]
            assert any(wanted == m or wanted.startswith(m + "/") for m in mounts), f"{name}: {wanted}"
    # The spool survives a restart: it is the StatefulSet's persistent volume.
    (claim,) = _by_kind("StatefulSet")["deskvault-wal-stream"]["spec"]["volumeClaimTemplates"]
    (streamer,) = _pod(_by_kind("StatefulSet")["deskvault-wal-stream"])["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": settings.wal.spool_dir} in streamer[
        "volumeMounts"
    ]
    # Every pod has a writable TMPDIR (the root filesystem is read-only).
    for name, workload in _workloads().items():
        mounts = [m["mountPath"] for m in _pod(workload)["containers"][0]["volumeMounts"]]
        assert "/var/lib/deskvault/tmp" in mounts, name


def test_the_downloads_service_reaches_the_endpoint() -> None:
    (service,) = [d for d in _by_kind("Service").values() if d["metadata"]["name"] == "deskvault-downloads"]
    (container,) = _pod(_by_kind("Deployment")["deskvault-downloads"])["containers"]
    assert (
        service["spec"]["selector"]
        == _by_kind("Deployment")["deskvault-downloads"]["spec"]["selector"]["matchLabels"]
    )
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}


def test_the_image_is_debian_slim_runs_as_non_root_and_holds_every_package() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    instructions = re.findall(r"^(FROM|USER|ENTRYPOINT|COPY|ARG) (.+)$", dockerfile, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim-bookworm$", dockerfile, re.M)
    users = [value for kind, value in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["deskvault"]') in instructions
    for package in ("postgresql-${major}", "postgresql-client-${major}", "unixodbc", "odbc-postgresql"):
        assert package in dockerfile
    # Every package the wheel installs is copied into the build, and let through the ignore file.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {
        p.split(".")[0].rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {value.split()[0] for kind, value in instructions if kind == "COPY" and "--from" not in value}
    assert top_level <= copied
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {f"!{p}/" for p in top_level} <= set(ignore)


SYSTEMD_UNITS = {
    "deskvault-scheduler.service": "scheduler",
    "deskvault-wal-stream.service": "wal-stream",
    "deskvault-worker@.service": "worker",
    "deskvault-downloads.service": "downloads",
}


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  (keys are case-sensitive)
    parser.read(path)
    return parser


def test_systemd_units_run_real_commands_and_outlast_the_stop_timeout() -> None:
    assert {p.name for p in (DEPLOY / "systemd").glob("*.service")} == set(SYSTEMD_UNITS)
    for name, command_name in SYSTEMD_UNITS.items():
        unit = _unit(DEPLOY / "systemd" / name)
        command = shlex.split(
            unit["Service"]["ExecStart"].replace("%i", "backup").replace("$DESKVAULT_WORKER_ARGS", "")
        )
        assert command[0].endswith("/deskvault")
        args = _parser().parse_args(command[1:])
        assert args.command == command_name
        assert unit["Service"]["User"] not in ("", "root")
        if command_name == "worker":  # one unit for every pool
            assert args.stop_timeout * 1000 >= max(TIME_LIMIT_MS.values())
            assert int(unit["Service"]["TimeoutStopSec"]) > args.stop_timeout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", sorted(SYSTEMD_UNITS))
def test_systemd_units_are_hardened_and_systemd_reads_every_line(name: str, tmp_path: Path) -> None:
    # The unit as installed, its ExecStart pointed at this checkout's deskvault so that verify can run it
    text = (DEPLOY / "systemd" / name).read_text()
    deskvault = Path(sys.executable).with_name("deskvault")
    unit = tmp_path / name
    unit.write_text(text.replace("/opt/deskvault/.venv/bin/deskvault", str(deskvault)))
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure, security.stdout + security.stderr
    assert float(exposure.group(1)) < 5.0, security.stdout
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # An unknown or misspelt setting, which systemd would ignore, is named here
    assert (verify.stdout + verify.stderr).strip() == "", verify.stdout + verify.stderr
