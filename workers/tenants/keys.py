"""Each tenant's own data key: what its exports are encrypted with, and what a purge destroys.

A tenant key is random, kept in the control database wrapped by the repository's key-encryption key,
and wraps the per-object data keys of that tenant's objects exactly as the key-encryption keys wrap
everyone else's. Deleting it (crypto-shredding) leaves every copy of those objects unreadable, wherever
a copy survives: an old object version, a replica, a download someone kept the ciphertext of.
"""

from __future__ import annotations

import base64
import os
import uuid

from workers.context import WorkerContext
from workers.errors import PermanentError
from workers.repository.keyring import KEY_BYTES, Keyring
from workers.repository.objects import ObjectRepository


class TenantKeyDestroyed(PermanentError):
    """The tenant was purged: its key, and with it everything encrypted for it, is gone."""


def tenant_keyring(ctx: WorkerContext, tenant: str, *, create: bool = False) -> Keyring:
    """The keyring holding `tenant`'s data key; with `create`, a first key is made if it has none."""
    stored = ctx.ledger.tenant_key(tenant)
    if stored is None and create:
        key = os.urandom(KEY_BYTES)
        kek_id, wrapped = ctx.repository.keyring.wrap(key)
        key_id = f"tenant-{uuid.uuid4().hex}"
        # Two workers may race to create it: the first stored key wins and both use it.
        ctx.ledger.add_tenant_key(tenant, key_id, kek_id, base64.b64encode(wrapped).decode("ascii"))
        stored = ctx.ledger.tenant_key(tenant)
    if stored is None:
        raise TenantKeyDestroyed(
            f"tenant: {tenant} has no data key (it was purged, or never had anything encrypted for it)"
        )
    key_id, kek_id, wrapped = stored
    return Keyring({key_id: ctx.repository.keyring.unwrap(kek_id, base64.b64decode(wrapped))}, key_id)


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
