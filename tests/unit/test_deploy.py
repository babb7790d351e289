"""ops/deploy agrees with the code: queue arguments, the CLI's flags, and shutdown grace periods."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import yaml

from deskvault.cli import _parser
from messages.topology import (
    DEFAULT_DELIVERY_LIMIT,
    POOLS,
    dead_letter_queue,
    dead_letter_queue_arguments,
    delay_queue,
    work_queue_arguments,
)
from workers.runner import STOP_TIMEOUT_MS

DEPLOY = Path(__file__).resolve().parents[2] / "ops" / "deploy"


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


def test_every_pool_has_a_deployment_scaled_on_its_own_queue() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "workers.yaml").read_text()))
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in documents if d["kind"] == "ScaledObject"}
    assert set(deployments) == set(scaled) == {f"deskvault-{pool}" for pool in POOLS}
    for pool in POOLS:
        spec = deployments[f"deskvault-{pool}"]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > STOP_TIMEOUT_MS / 1000
        (container,) = spec["containers"]
        parsed = _parser().parse_args(container["args"])  # the flags exist and mean what they say
        assert parsed.pools == [pool]
        (trigger,) = scaled[f"deskvault-{pool}"]["spec"]["triggers"]
        assert trigger["metadata"]["queueName"] == pool


def test_systemd_units_run_real_commands_and_outlast_the_stop_timeout() -> None:
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(unit)
        command = shlex.split(
            parser["Service"]["ExecStart"].replace("%i", "backup").replace("$DESKVAULT_WORKER_ARGS", "")
        )
        assert command[0].endswith("/deskvault")
        _parser().parse_args(command[1:])
        if "worker" in command:
            assert int(parser["Service"]["TimeoutStopSec"]) > STOP_TIMEOUT_MS / 1000
