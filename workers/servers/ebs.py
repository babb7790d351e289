"""EBS snapshot sets: every volume of a server at one instant, copied to a disaster-recovery region.

One `create_snapshots` call snapshots all attached volumes of the instance as a crash-consistent set.
Every snapshot carries tags naming the server, the set (server and slot) and the event's idempotency
key, so a redelivered event finds the snapshots it already made instead of making more; the DR copies
carry the id of the snapshot they copy for the same reason. Completion is awaited with backoff; the set
is then recorded in the repository (`servers/<S>/ebs-sets/<set>.json.dv`). Retention keeps, in each
region, the newest set of each of the last N days and M weeks, and never the newest complete set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from deskvault_core.config import ServerSettings
from workers.errors import HandlerError, PermanentError
from workers.repository.objects import ObjectRepository
from workers.servers.retention import keep

log = logging.getLogger(__name__)

TAG_SERVER = "deskvault:server"
TAG_SET = "deskvault:set"
TAG_SLOT = "deskvault:slot"
TAG_EVENT = "deskvault:event-key"
TAG_SOURCE = "deskvault:source-snapshot"
# Errors that a retry cannot fix: wrong ids, keys or rights.
_PERMANENT_CODES = (
    "NotFound",
    "Malformed",
    "InvalidParameter",
    "UnauthorizedOperation",
    "AuthFailure",
    "KMS",
)
MAX_WAIT_SECONDS = 6 * 3600


class EbsError(HandlerError):
    """AWS did not do what the snapshot set needs; retried with backoff."""


def check_settings(server: ServerSettings) -> None:
    """PermanentError naming the setting when an ebs server is configured incompletely."""
    where = f"servers.{server.name}"
    if not server.region:
        raise PermanentError(f"{where}.region: not set; the region the instance runs in")
    if not (server.instance_id or server.instance_tag):
        raise PermanentError(f'{where}.instance_id: set it, or instance_tag as "Key=Value"')
    if server.instance_tag and "=" not in server.instance_tag:
        raise PermanentError(f'{where}.instance_tag: {server.instance_tag!r} is not "Key=Value"')
    if server.dr_region and not server.dr_kms_key:
        raise PermanentError(f"{where}.dr_kms_key: not set; the KMS key in {server.dr_region} for the copies")
    if server.dr_kms_key and not server.dr_region:
        raise PermanentError(f"{where}.dr_region: not set; the region the copies go to")


def set_key(server: str, set_id: str) -> str:
    return f"servers/{server}/ebs-sets/{set_id}.json.dv"


def list_sets(repo: ObjectRepository, server: str) -> list[dict[str, Any]]:
    """The recorded snapshot sets of `server`, oldest first (the record stays after AWS pruned a set)."""
    found = [
        repo.get_json(k) for k in repo.list_keys(f"servers/{server}/ebs-sets/") if k.endswith(".json.dv")
    ]
    return sorted((r for r in found if isinstance(r, dict)), key=lambda r: r["set_id"])


class EbsDriver:
    def __init__(
        self,
        server: ServerSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        check_settings(server)
        self.server = server
        self.sleep = sleep
        self.clock = clock
        self.source = _client(server.region, server.ec2_endpoint)
        self.dr = _client(server.dr_region, server.ec2_endpoint) if server.dr_region else None

    def take_set(
        self, repo: ObjectRepository, *, slot: datetime, event_key: str
    ) -> tuple[dict[str, Any], bool]:
        """Snapshot, copy and record the set for `slot`; (record, False) if it was recorded before."""
        set_id = f"{self.server.name}-{slot:%Y%m%dT%H%M%SZ}"
        key = set_key(self.server.name, set_id)
        if repo.exists(key):
            existing = repo.get_json(key)
            assert isinstance(existing, dict)
            return existing, False
        tags = {
            TAG_SERVER: self.server.name,
            TAG_SET: set_id,
            TAG_SLOT: f"{slot:%Y-%m-%dT%H:%M:%SZ}",
            TAG_EVENT: event_key,
        }
        instance = self._instance()
        snapshots = self._find(self.source, {TAG_SET: set_id})
        if not snapshots:
            snapshots = self._create(instance, set_id, tags)
        snapshots = self._await(self.source, [s["SnapshotId"] for s in snapshots], self.server.region)
        copies: list[dict[str, Any]] = []
        if self.dr is not None:
            copies = [self._copy(s, tags) for s in snapshots]
            copies = self._await(self.dr, [c["SnapshotId"] for c in copies], self.server.dr_region)
        record = {
            "format": 1,
            "server": self.server.name,
            "driver": "ebs",
            "set_id": set_id,
            "slot": tags[TAG_SLOT],
            "instance_id": instance,
            "region": self.server.region,
            "snapshots": [_describe(s) for s in snapshots],
            "dr_region": self.server.dr_region or None,
            "dr_kms_key": self.server.dr_kms_key or None,
            "dr_snapshots": [_describe(c) for c in copies],
            "recorded_at": f"{self.clock():%Y-%m-%dT%H:%M:%SZ}",
            "event_key": event_key,
        }
        return repo.commit_json(key, record)

    def prune(self) -> dict[str, int]:
        """Apply retention in each region; how many snapshots were deleted per region."""
        deleted = {self.server.region: self._prune(self.source)}
        if self.dr is not None:
            deleted[self.server.dr_region] = self._prune(self.dr)
        return deleted

    # -- AWS calls ----------------------------------------------------------------------------------
    def _instance(self) -> str:
        if self.server.instance_id:
            filters = [{"Name": "instance-id", "Values": [self.server.instance_id]}]
        else:
            name, value = self.server.instance_tag.split("=", 1)
            filters = [{"Name": f"tag:{name}", "Values": [value]}]
        filters.append({"Name": "instance-state-name", "Values": ["running", "stopped", "stopping"]})
        found = [
            i["InstanceId"]
            for page in self._call(self.source.get_paginator("describe_instances").paginate, Filters=filters)
            for r in page["Reservations"]
            for i in r["Instances"]
        ]
        wanted = self.server.instance_id or self.server.instance_tag
        if len(found) != 1:
            raise PermanentError(
                f"servers.{self.server.name}: {len(found)} instances match {wanted!r} in "
                f"{self.server.region}; exactly one must"
            )
        return found[0]

    def _create(self, instance: str, set_id: str, tags: dict[str, str]) -> list[dict[str, Any]]:
        log.info("ebs: snapshotting every volume of %s as set %s", instance, set_id)
        answer = self._call(
            self.source.create_snapshots,
            InstanceSpecification={"InstanceId": instance, "ExcludeBootVolume": False},
            Description=f"deskvault {set_id}",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": _tag_list(tags)}],
            CopyTagsFromSource="volume",
        )
        snapshots: list[dict[str, Any]] = answer["Snapshots"]
        return snapshots

    def _copy(self, snapshot: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
        assert self.dr is not None
        existing = self._find(self.dr, {TAG_SOURCE: snapshot["SnapshotId"]})
        if existing:
            return existing[0]
        answer = self._call(
            self.dr.copy_snapshot,
            SourceRegion=self.server.region,
            SourceSnapshotId=snapshot["SnapshotId"],
            Encrypted=True,
            KmsKeyId=self.server.dr_kms_key,
            Description=f"deskvault {tags[TAG_SET]} (copy of {snapshot['SnapshotId']})",
            TagSpecifications=[
                {"ResourceType": "snapshot", "Tags": _tag_list({**tags, TAG_SOURCE: snapshot["SnapshotId"]})}
            ],
        )
        return {"SnapshotId": answer["SnapshotId"]}

    def _find(self, client: Any, tags: dict[str, str]) -> list[dict[str, Any]]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        pages = self._call(
            client.get_paginator("describe_snapshots").paginate, OwnerIds=["self"], Filters=filters
        )
        return [s for page in pages for s in page["Snapshots"]]

    def _await(self, client: Any, ids: list[str], region: str) -> list[dict[str, Any]]:
        """The snapshots once all are completed, polled with backoff; EbsError if one failed."""
        delay, waited = 2.0, 0.0
        while True:
            found = self._call(client.describe_snapshots, SnapshotIds=ids)["Snapshots"]
            failed = [s["SnapshotId"] for s in found if s["State"] == "error"]
            if failed:
                raise EbsError(
                    f"snapshot(s) {', '.join(failed)} in {region} failed; the next delivery retries"
                )
            if len(found) == len(ids) and all(s["State"] == "completed" for s in found):
                return sorted(found, key=lambda s: s["SnapshotId"])
            if waited > MAX_WAIT_SECONDS:
                raise EbsError(f"snapshot(s) in {region} still not completed after {waited:.0f}s")
            log.info("ebs: waiting %.0fs for %d snapshot(s) in %s", delay, len(ids), region)
            self.sleep(delay)
            waited += delay
            delay = min(delay * 2, 60.0)

    def _prune(self, client: Any) -> int:
        snapshots = self._find(client, {TAG_SERVER: self.server.name})
        sets: dict[str, list[dict[str, Any]]] = {}
        for snapshot in snapshots:
            tags = {t["Key"]: t["Value"] for t in snapshot.get("Tags", [])}
            if TAG_SET in tags and TAG_SLOT in tags:
                sets.setdefault(tags[TAG_SET], []).append({**snapshot, "_slot": tags[TAG_SLOT]})
        complete = {
            set_id: datetime.fromisoformat(members[0]["_slot"])
            for set_id, members in sets.items()
            if all(m["State"] == "completed" for m in members)
        }
        kept = keep(complete.items(), daily=self.server.keep_daily, weekly=self.server.keep_weekly)
        deleted = 0
        # Only complete sets outside the policy go; a set still being made is left alone.
        for set_id in sorted(set(complete) - kept):
            for snapshot in sets[set_id]:
                self._call(client.delete_snapshot, SnapshotId=snapshot["SnapshotId"])
                deleted += 1
        return deleted

    def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            result = method(**kwargs)
            return list(result) if not isinstance(result, dict) else result
        except NoCredentialsError:
            raise PermanentError(
                "AWS credentials: none found for the ebs driver; give the worker an instance role or the "
                "AWS_* environment variables"
            ) from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            message = f"AWS said {code}: {e.response.get('Error', {}).get('Message', '')[:300]}"
            if any(part in code for part in _PERMANENT_CODES):
                raise PermanentError(f"servers.{self.server.name}: {message}") from None
            raise EbsError(f"servers.{self.server.name}: {message}; retried") from None
        except BotoCoreError as e:
            raise EbsError(
                f"servers.{self.server.name}: cannot reach EC2 ({type(e).__name__}); retried"
            ) from None


def _client(region: str, endpoint: str) -> Any:
    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client(
        "ec2", region_name=region, endpoint_url=endpoint or None, config=config
    )


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _describe(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {
        "snapshot_id": snapshot["SnapshotId"],
        "volume_id": snapshot.get("VolumeId"),
        "size_gib": snapshot.get("VolumeSize"),
        "encrypted": snapshot.get("Encrypted"),
        "kms_key_id": snapshot.get("KmsKeyId"),
    }
