"""Where backups live in the bucket, and reading them back: the repository describes itself.

Layout under the repository prefix:
    targets/<target>/backups/<backup_id>/<attempt>/<object>.dv   data objects (compressed, encrypted)
    targets/<target>/backups/<backup_id>/manifest.dv             the manifest, written last (commit point)
A backup without a manifest is incomplete and is never restored from. Each attempt at a backup writes
its data under a folder of its own, so an attempt that was superseded (a lost lease, a stall) can never
overwrite the objects another attempt's manifest committed; the manifest names the objects it owns, and
retention cleans up the rest.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from workers.repository.crypto import header_key_id
from workers.repository.errors import KeyNotFound, RepositoryError
from workers.repository.objects import ObjectRepository

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.dv"
MANIFEST_FORMAT = 1


def iso(moment: datetime) -> str:
    """Timestamps as manifests store them: UTC, microseconds, `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backup_prefix(target: str, backup_id: str) -> str:
    return f"targets/{target}/backups/{backup_id}/"


def manifest_key(target: str, backup_id: str) -> str:
    return backup_prefix(target, backup_id) + MANIFEST_NAME


def attempt_prefix(target: str, backup_id: str) -> str:
    """A fresh folder for one attempt's data objects: no two attempts ever write the same key."""
    return f"{backup_prefix(target, backup_id)}{uuid.uuid4().hex[:12]}/"


def referenced_keys(manifest: dict[str, Any]) -> set[str]:
    """The objects a committed manifest owns (its data objects and file list)."""
    keys = {o["key"] for o in manifest.get("objects", ())}
    if manifest.get("file_list"):
        keys.add(manifest["file_list"])
    return keys


def backup_id_for(kind: str, slot: datetime) -> str:
    """Derived from the event's business key, so a retry of the same event writes the same objects."""
    return f"{slot:%Y%m%dT%H%M%SZ}-{kind}"


def has_full(repo: ObjectRepository, target: str) -> bool:
    """Whether a full backup of the target is committed (its manifest written), by key names alone."""
    return any(key.endswith(f"-full/{MANIFEST_NAME}") for key in repo.list_keys(f"targets/{target}/backups/"))


def list_manifests(repo: ObjectRepository, target: str) -> list[dict[str, Any]]:
    """Every committed backup of a target, oldest first (unreadable manifests are logged and left out)."""
    return scan_manifests(repo, target)[0]


def scan_manifests(repo: ObjectRepository, target: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every committed backup of a target, oldest first, and the manifests that failed to read (key -> why).

    A damaged manifest makes its backup unusable, not the chain: restores plan around it and say so.
    """
    manifests, damaged = [], {}
    for key in repo.list_keys(f"targets/{target}/backups/"):
        if not key.endswith("/" + MANIFEST_NAME):
            continue
        try:
            manifests.append(repo.get_json(key))
        except RepositoryError as e:
            why = f"key id {_key_id(repo, key, e)}: {e}"
            log.error("skipping unreadable manifest %s (%s)", key, why)
            damaged[key] = why
    return sorted(manifests, key=lambda m: (m["finished_at"], m["backup_id"])), damaged


class ManifestsUnreadable(RepositoryError):
    """Some of a target's manifests could not be read, so nothing may be judged unreferenced."""

    def __init__(self, target: str, damaged: dict[str, str]) -> None:
        listed = "; ".join(f"{key} ({why})" for key, why in sorted(damaged.items()))
        super().__init__(
            f"target {target}: {len(damaged)} manifest(s) cannot be read, so retention stopped and deleted "
            f"nothing: {listed}. Load the key file that holds those key ids (or restore the damaged "
            f"manifest from a bucket version), then run "
            f"`deskvault backups expire --target {target} --dry-run`"
        )
        self.target = target
        self.damaged = damaged


def every_manifest(repo: ObjectRepository, target: str) -> list[dict[str, Any]]:
    """Every committed backup of a target, oldest first, or ManifestsUnreadable: for callers that delete.

    Deleting is judged against what the manifests reference; a manifest that cannot be read (unknown key,
    damage, a storage error) may reference anything, so it stops the deletion instead of being skipped.
    """
    manifests, damaged = scan_manifests(repo, target)
    if damaged:
        raise ManifestsUnreadable(target, damaged)
    return manifests


def _key_id(repo: ObjectRepository, key: str, error: RepositoryError) -> str:
    """The id of the key an unreadable object was encrypted with, or why it is not known."""
    if isinstance(error, KeyNotFound):
        return error.key_id
    try:
        return header_key_id(repo.store.get_bytes(key)[:512])
    except Exception as e:  # only describing an error already being reported
        return f"unknown ({type(e).__name__})"


def newest_full(repo: ObjectRepository, target: str, backup_id: str | None = None) -> dict[str, Any]:
    fulls = [m for m in list_manifests(repo, target) if m["kind"] == "full"]
    if backup_id is not None:
        fulls = [m for m in fulls if m["backup_id"] == backup_id]
    if not fulls:
        wanted = f"backup {backup_id}" if backup_id else "any full backup"
        raise RepositoryError(
            f"target {target}: {wanted} not found in the repository; run `deskvault backups list --target "
            f"{target}` to see what exists"
        )
    return fulls[-1]
