"""Each tenant's own data key: what its exports are encrypted with, and what a purge destroys.

A tenant key is random and wraps the per-object data keys of that tenant's objects exactly as the
key-encryption keys (KEKs) wrap everyone else's. Destroying it (crypto-shredding) leaves every copy of
those objects unreadable, wherever a copy survives: an old object version, a replica, a download someone
kept the ciphertext of.

Where the key lives decides whether destroying it is real. It used to be a row of the control
database, wrapped by a KEK; but the control database is backed up like any database, and a restore of a
backup taken before the purge brought the row back, and with the KEK still in the key file the purged
tenant's kept ciphertext decrypted again. So each tenant key is now one object of the key store,
`keystore/tenants/<tenant>`, in the repository's bucket:

- written as a normal encrypted repository object (`ObjectRepository.put_json` through
  `ctx.repository`): wrapped by the active KEK, whose id its header names, so `deskvault keys list`
  counts it like any other object and a KEK still wrapping tenant keys cannot be retired;
- created with If-None-Match, so two workers making a tenant's first key at once both end up using the
  first one stored (the loser reads the winner's back);
- destroyed at purge by deleting every version of the object and then checking that none remains
  (`destroy_tenant_key`): a store that refuses (object lock, a policy without
  `s3:DeleteObjectVersion`) fails the purge loudly and the account is never marked purged.

Backups of the control database therefore hold no tenant key. The bucket is not "backed up" the same
way: its old versions are what a purge deletes, every one of them.

Legacy keys: versions before the key store wrote tenant keys into the control database
(`dv_tenant_keys`). Such a key is moved into the key store on its first use (stored first, then its row
deleted), and a purge deletes both the row and the object. Control-database backups taken before the
upgrade (before the move) still hold those legacy rows: restored, a purged tenant's legacy key comes
back from them, so such backups must be destroyed, or aged out, as the purge promise requires.
"""

from __future__ import annotations

import base64
import binascii
import os
import uuid

from workers.context import WorkerContext
from workers.errors import HandlerError, PermanentError
from workers.repository.errors import AlreadyExists, IntegrityError, ObjectNotFound, RepositoryError
from workers.repository.keyring import KEY_BYTES, Keyring, valid_key_id
from workers.repository.objects import ObjectRepository

KEYSTORE_FORMAT = 1


class TenantKeyDestroyed(PermanentError):
    """The tenant was purged: its key, and with it everything encrypted for it, is gone."""


class TenantKeyNotDestroyed(HandlerError):
    """A purge could not destroy the tenant's key; retried, and the account stays `purging` meanwhile."""


def keystore_key(tenant: str) -> str:
    """The repository object holding `tenant`'s data key."""
    return f"keystore/tenants/{tenant}"


def tenant_keyring(ctx: WorkerContext, tenant: str, *, create: bool = False) -> Keyring:
    """The keyring holding `tenant`'s data key; with `create`, a first key is made if it has none."""
    stored = _stored_key(ctx, tenant)
    if stored is None:
        stored = _moved_legacy_key(ctx, tenant)
    if stored is None and create:
        stored = _store_first(ctx, tenant, f"tenant-{uuid.uuid4().hex}", os.urandom(KEY_BYTES))
    if stored is None:
        raise TenantKeyDestroyed(
            f"tenant: {tenant} has no data key (it was purged, or never had anything encrypted for it)"
        )
    key_id, key = stored
    return Keyring({key_id: key}, key_id)


def tenant_repository(ctx: WorkerContext, tenant: str, *, create: bool = False) -> ObjectRepository:
    """The repository, with `tenant`'s key wrapping the data keys of what is stored or read."""
    repo = ctx.repository
    return ObjectRepository(
        repo.store,
        tenant_keyring(ctx, tenant, create=create),
        zstd_level=repo.zstd_level,
        zstd_threads=repo.zstd_threads,
        frame_size=repo.frame_size,
    )


def tenant_prefix(tenant: str) -> str:
    """Where a tenant's own objects (exports, downloadable backups) live in the repository."""
    return f"tenants/{tenant}/"


def abort_tenant_uploads(ctx: WorkerContext, tenant: str) -> int:
    """Abort every unfinished multipart upload under the tenant's prefix or at its key store object.

    Parts of an unfinished upload are stored data a listing of objects does not show; a purge must not
    leave them. Returns how many uploads were aborted.
    """
    store = ctx.repository.store
    aborted = ctx.repository.abort_uploads(tenant_prefix(tenant))
    key = keystore_key(tenant)
    # Listed by prefix, kept only at the exact key: `keystore/tenants/ab` must not reach tenant `abc`.
    for listed, upload_id, _ in store.multipart_uploads(key):
        if listed == key:
            store.abort_upload(listed, upload_id)
            aborted += 1
    return aborted


def destroy_tenant_key(ctx: WorkerContext, tenant: str) -> bool:
    """Destroy `tenant`'s data key for good: its legacy row, every version of its key store object.

    Returns False if there was nothing left to destroy (an earlier attempt did it). Raises
    TenantKeyNotDestroyed, naming why, if any version remains: the caller must not mark the tenant
    purged then. The row goes first, so that no first use can move a legacy key into the store after
    the object's versions were deleted and checked.
    """
    store = ctx.repository.store
    key = keystore_key(tenant)
    where = f"s3://{store.bucket}/{store.prefix}{key}"
    legacy = ctx.ledger.forget_legacy_tenant_key(tenant)
    try:
        deleted = store.delete_every_version(key)
        left = store.object_versions(key)
    except RepositoryError as e:
        raise TenantKeyNotDestroyed(
            f"purge of tenant {tenant}: could not delete every version of its key object {where} "
            f"({e}); if the store refused it, object lock (a retention period or legal hold on the "
            "object) or a bucket policy without s3:DeleteObjectVersion is why. The key, and with it the "
            "tenant's surviving ciphertext, stays readable and the account stays `purging`: lift the "
            "lock or grant the permission, then the purge's retry completes it"
        ) from None
    if left:
        raise TenantKeyNotDestroyed(
            f"purge of tenant {tenant}: {len(left)} version(s) of its key object {where} remain after "
            "deleting them (object lock, or a store that ignores version deletes?); the key stays "
            "readable and the account stays `purging` until they are gone"
        )
    return legacy or deleted > 0


def _stored_key(ctx: WorkerContext, tenant: str) -> tuple[str, bytes] | None:
    """The key in the key store: (key id, key), or None if the store holds none."""
    key = keystore_key(tenant)
    try:
        doc = ctx.repository.get_json(key)
    except ObjectNotFound:
        return None
    stored = _key_material(doc, tenant)
    if stored is None:
        raise IntegrityError(
            f"it decrypted fine but is not tenant {tenant}'s key document (format {KEYSTORE_FORMAT})", key
        )
    return stored


def _key_material(doc: object, tenant: str) -> tuple[str, bytes] | None:
    """(key id, key) from a key document of `tenant`'s, or None if it is not one."""
    if not isinstance(doc, dict) or doc.get("format") != KEYSTORE_FORMAT or doc.get("tenant") != tenant:
        return None
    key_id, encoded = doc.get("key_id"), doc.get("key")
    if not isinstance(key_id, str) or not valid_key_id(key_id) or not isinstance(encoded, str):
        return None
    try:
        material = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return None
    return (key_id, material) if len(material) == KEY_BYTES else None


def _store_first(ctx: WorkerContext, tenant: str, key_id: str, key: bytes) -> tuple[str, bytes]:
    """Store a key unless one is stored already; either way, the key stored (the first one wins)."""
    doc = {
        "format": KEYSTORE_FORMAT,
        "tenant": tenant,
        "key_id": key_id,
        "key": base64.b64encode(key).decode("ascii"),
        "created_at": ctx.ledger.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        ctx.repository.put_json(keystore_key(tenant), doc, if_none_match=True)
    except AlreadyExists:
        pass
    # Read back either way: what is stored is the one key every worker uses.
    stored = _stored_key(ctx, tenant)
    if stored is None:
        raise RepositoryError(
            f"tenant {tenant}'s key was stored at {keystore_key(tenant)!r} but cannot be read back; "
            "check the bucket's consistency and try again"
        )
    return stored


def _moved_legacy_key(ctx: WorkerContext, tenant: str) -> tuple[str, bytes] | None:
    """A key left in the control database by an older version, moved into the key store."""
    legacy = ctx.ledger.legacy_tenant_key(tenant)
    if legacy is None:
        return None
    key_id, kek_id, wrapped = legacy
    key = ctx.repository.keyring.unwrap(kek_id, base64.b64decode(wrapped))
    if ((ctx.ledger.account(tenant) or {}).get("status")) in ("purging", "purged"):
        return key_id, key  # a purge is destroying it: never write it anywhere new
    stored = _store_first(ctx, tenant, key_id, key)
    if stored[0] != key_id:
        # Cannot happen through deskvault (the store is read first); keep the row rather than lose a key.
        raise RepositoryError(
            f"tenant {tenant} has key {key_id!r} in the control database and a different key "
            f"{stored[0]!r} at {keystore_key(tenant)!r}; the row is kept: find out which key its "
            "objects name (their header) before removing either"
        )
    ctx.ledger.forget_legacy_tenant_key(tenant)  # only once the store holds it
    return stored
