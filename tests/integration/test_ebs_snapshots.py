"""The EBS driver against moto's standalone server: an EC2 and KMS emulator, the only offline option.

Nothing here proves AWS itself behaves so; it proves the driver's calls, tags, copies, idempotency and
retention against a faithful emulation of the API, over real HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from support import free_port, run_cli, wait_for, worker_context

from messages.events import SnapshotDue
from workers.context import WorkerContext
from workers.errors import PermanentError
from workers.handlers.snapshot import handle_snapshot_due
from workers.servers.ebs import TAG_EVENT, TAG_SERVER, TAG_SET, TAG_SOURCE, EbsDriver, set_key
from workers.servers.retention import keep

pytestmark = pytest.mark.integration

SOURCE, DR = "us-east-1", "eu-west-1"


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    """moto's server in a process of its own, on loopback."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    binary = Path(sys.executable).parent / "moto_server"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            return True
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, what="moto_server to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    ec2 = boto3.client("ec2", region_name=SOURCE, endpoint_url=moto_endpoint)
    dr = boto3.client("ec2", region_name=DR, endpoint_url=moto_endpoint)
    kms = boto3.client("kms", region_name=DR, endpoint_url=moto_endpoint)
    return ec2, dr, kms


@pytest.fixture
def ebs_server(aws, moto_endpoint, make_settings):
    """An instance with two volumes, a KMS key in the DR region, a configured server."""
    ec2, _, kms = aws
    name = f"app-{uuid.uuid4().hex[:8]}"
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        BlockDeviceMappings=[
            {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 20}},
            {"DeviceName": "/dev/sdg", "Ebs": {"VolumeSize": 50}},
        ],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}],
    )
    key = kms.create_key(Description="deskvault DR copies")["KeyMetadata"]["Arn"]
    extra = (
        f'[servers.{name}]\ndriver = "ebs"\ninstance_tag = "Name={name}"\nregion = "{SOURCE}"\n'
        f'dr_region = "{DR}"\ndr_kms_key = "{key}"\nec2_endpoint = "{moto_endpoint}"\n'
        "keep_daily = 3\nkeep_weekly = 2\n"
    )
    ctx = worker_context(make_settings(extra=extra))
    return ctx, name, key


def _tagged(client, key: str, value: str) -> list[dict]:
    found = client.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": f"tag:{key}", "Values": [value]}])
    return found["Snapshots"]


def test_a_set_is_made_tagged_copied_encrypted_and_recorded(aws, ebs_server) -> None:
    ec2, dr, _ = aws
    ctx, name, key = ebs_server
    slot = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    event = SnapshotDue.new(server=name, slot=slot)

    outcome = handle_snapshot_due(ctx, event)

    set_id = f"{name}-20261202T030000Z"
    assert outcome.startswith(f"snapshot set {set_id}: ")
    made = _tagged(ec2, TAG_SET, set_id)
    volumes = ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [_instance(ec2, name)]}]
    )
    assert len(made) == len(volumes["Volumes"]) == 2  # both attached volumes, as one set
    for snapshot in made:
        tags = {t["Key"]: t["Value"] for t in snapshot["Tags"]}
        assert (tags[TAG_SERVER], tags[TAG_EVENT]) == (name, event.idempotency_key)
    copies = _tagged(dr, TAG_SET, set_id)
    sources = sorted({t["Key"]: t["Value"] for t in c["Tags"]}[TAG_SOURCE] for c in copies)
    assert sources == sorted(s["SnapshotId"] for s in made)
    assert all(c["Encrypted"] and c["KmsKeyId"] == key for c in copies)
    record = ctx.repository.get_json(set_key(name, set_id))
    assert {s["snapshot_id"] for s in record["snapshots"]} == {s["SnapshotId"] for s in made}
    assert len(record["dr_snapshots"]) == len(made)


def _instance(ec2, name: str) -> str:
    found = ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": [name]}])
    return found["Reservations"][0]["Instances"][0]["InstanceId"]


def test_a_redelivery_after_a_crash_finds_its_snapshots_instead_of_making_more(aws, ebs_server) -> None:
    ec2, dr, _ = aws
    ctx, name, _ = ebs_server
    slot = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)
    set_id = f"{name}-20261203T030000Z"
    driver = EbsDriver(ctx.settings.servers[name])
    # The first delivery made the snapshots and died before copying or recording them.
    driver._create(
        _instance(ec2, name),
        set_id,
        {TAG_SERVER: name, TAG_SET: set_id, "deskvault:slot": "2026-12-03T03:00:00Z", TAG_EVENT: "first"},
    )
    made = {s["SnapshotId"] for s in _tagged(ec2, TAG_SET, set_id)}

    handle_snapshot_due(ctx, SnapshotDue.new(server=name, slot=slot))
    again = handle_snapshot_due(
        ctx, SnapshotDue.new(server=name, slot=slot, idempotency_key=uuid.uuid4().hex)
    )

    assert again.startswith(f"snapshot set (already taken) {set_id}")
    assert {s["SnapshotId"] for s in _tagged(ec2, TAG_SET, set_id)} == made
    assert len(_tagged(dr, TAG_SET, set_id)) == len(made)


def test_retention_keeps_exactly_the_daily_and_weekly_sets_in_both_regions(aws, ebs_server) -> None:
    ec2, dr, _ = aws
    ctx, name, _ = ebs_server
    start = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)  # a Monday
    slots = [start + timedelta(days=i) for i in range(17)]
    for slot in slots:
        handle_snapshot_due(ctx, SnapshotDue.new(server=name, slot=slot))
    ids = {f"{name}-{s:%Y%m%dT%H%M%SZ}": s for s in slots}
    expected = keep(ids.items(), daily=3, weekly=2)
    assert len(expected) == 4  # the last three days (Mon-Wed), and the Sunday that ended the week before
    for client in (ec2, dr):
        left = {
            t["Value"] for s in _tagged(client, TAG_SERVER, name) for t in s["Tags"] if t["Key"] == TAG_SET
        }
        assert left == expected


def test_bad_server_settings_are_refused_and_nothing_is_made(aws, ebs_server) -> None:
    ec2, _, _ = aws
    ctx, name, _ = ebs_server
    server = ctx.settings.servers[name]
    cases = {
        "region": (dataclasses.replace(server, region=""), r"\.region: not set"),
        "key": (dataclasses.replace(server, dr_kms_key=""), r"\.dr_kms_key: not set"),
        "instance": (
            dataclasses.replace(server, instance_tag="Name=nobody"),
            r"0 instances match 'Name=nobody'",
        ),
    }
    for label, (broken, reason) in cases.items():
        settings = dataclasses.replace(ctx.settings, servers={name: broken})
        broken_ctx = WorkerContext(settings=settings, ledger=ctx.ledger, repository=ctx.repository)
        slot = datetime(2026, 12, 9, 3, 0, tzinfo=UTC)
        with pytest.raises(PermanentError, match=reason):
            handle_snapshot_due(
                broken_ctx,
                SnapshotDue.new(server=name, slot=slot, idempotency_key=f"{label}-{uuid.uuid4().hex}"),
            )
    assert _tagged(ec2, TAG_SET, f"{name}-20261209T030000Z") == []
    assert not ctx.repository.exists(set_key(name, f"{name}-20261209T030000Z"))


def test_snapshots_list_shows_the_recorded_sets(ebs_server) -> None:
    ctx, name, _ = ebs_server
    handle_snapshot_due(ctx, SnapshotDue.new(server=name, slot=datetime(2026, 12, 10, 3, 0, tzinfo=UTC)))
    listed = run_cli(ctx.settings, "snapshots", "list", "--server", name, "--json")
    assert listed.returncode == 0, listed.stderr
    (record,) = json.loads(listed.stdout)
    assert (record["set_id"], record["region"], record["dr_region"]) == (
        f"{name}-20261210T030000Z",
        SOURCE,
        DR,
    )
    table = run_cli(ctx.settings, "snapshots", "list", "--server", name)
    assert f"ebs set {name}-20261210T030000Z: 2 volume(s) in {SOURCE}, copies in {DR}: 2" in table.stdout
