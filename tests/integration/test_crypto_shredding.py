"""Crypto-shredding that survives restores of the control database (issue 15, items 5 and 8).

Real PostgreSQL (the tenant's database on the target, the control database backed up with pg_dump and
restored into a fresh database), real SeaweedFS (including a bucket under object lock), real RabbitMQ
for the export's `export-ready`. The clock is injected.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from support import clocked_context

from messages.events import AccountExpired, ExportRequested, PurgeDue
from workers.context import WorkerContext, open_repository
from workers.engines.postgresql.cluster import DEFAULT_PG_BIN
from workers.handlers.export import handle_export_requested
from workers.handlers.lifecycle import handle_account_expired
from workers.handlers.purge import handle_purge_due
from workers.ledger.ledger import Ledger
from workers.repository.crypto import decrypt_stream, header_key_id
from workers.repository.errors import IntegrityError, KeyNotFound, ObjectNotFound, RepositoryError
from workers.repository.keyring import Keyring
from workers.repository.objects import ObjectRepository
from workers.tenants import exports
from workers.tenants.keys import (
    TenantKeyDestroyed,
    TenantKeyNotDestroyed,
    keystore_key,
    tenant_keyring,
    tenant_prefix,
    tenant_repository,
)

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
PURGE_AFTER = datetime(2027, 4, 2, 12, 0, tzinfo=UTC)  # paid: four months after expiry
PG = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]


def _control_database(odbc: str) -> str:
    return next(p.split("=", 1)[1] for p in odbc.split(";") if p.upper().startswith("DATABASE="))


def _pg_dump(database: str, into: Path) -> str:
    """A plain-SQL backup of the control database, as an operator's nightly pg_dump takes it."""
    subprocess.run(
        [str(DEFAULT_PG_BIN / "pg_dump"), *PG, "-d", database, "--no-owner", "-f", str(into)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return into.read_text()


def _restore(dump: Path) -> str:
    """The dump restored into a fresh database; returns the fresh database's name."""
    name = f"dvrestored_{uuid.uuid4().hex[:10]}"
    psql = [str(DEFAULT_PG_BIN / "psql"), "-X", "-q", *PG, "-v", "ON_ERROR_STOP=1"]
    subprocess.run([*psql, "-d", "postgres", "-c", f"CREATE DATABASE {name}"], check=True, timeout=60)
    subprocess.run([*psql, "-d", name, "-f", str(dump)], check=True, capture_output=True, timeout=120)
    return name


def _drop(database: str) -> None:
    drop = f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    psql = [str(DEFAULT_PG_BIN / "psql"), "-X", "-q", *PG, "-d", "postgres", "-c", drop]
    subprocess.run(psql, capture_output=True, timeout=60)


def _key_rows(dump: str, tenant: str) -> list[str]:
    """The rows of dv_tenant_keys in a plain pg_dump that belong to `tenant`."""
    rows, inside = [], False
    for line in dump.splitlines():
        if line.startswith("COPY public.dv_tenant_keys "):
            inside = True
        elif inside and line == "\\.":
            inside = False
        elif inside and line.split("\t", 1)[0] == tenant:
            rows.append(line)
    return rows


def _legacy_rows(ctx: WorkerContext, tenant: str) -> int:
    with ctx.ledger.transaction() as cur:
        return int(cur.execute("SELECT count(*) FROM dv_tenant_keys WHERE tenant = ?", tenant).fetchone()[0])


def _write_legacy_key(ctx: WorkerContext, tenant: str) -> Keyring:
    """A tenant key stored the way versions before the key store did: a row, wrapped by the KEK."""
    key = uuid.uuid4().bytes * 2
    key_id = f"tenant-{uuid.uuid4().hex}"
    kek_id, wrapped = ctx.repository.keyring.wrap(key)
    with ctx.ledger.transaction() as cur:
        cur.execute(
            "INSERT INTO dv_tenant_keys (tenant, key_id, kek_id, wrapped_key, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            tenant,
            key_id,
            kek_id,
            base64.b64encode(wrapped).decode("ascii"),
            NOW.replace(tzinfo=None),
        )
    return Keyring({key_id: key}, key_id)


def _versions(ctx: WorkerContext, key: str) -> list[str]:
    """Every version id (and delete marker) stored at exactly `key`, listed with the raw client."""
    store = ctx.repository.store
    full = store.full_key(key)
    listed = store.client.list_object_versions(Bucket=store.bucket, Prefix=full)
    items = [*listed.get("Versions", []), *listed.get("DeleteMarkers", [])]
    return [item["VersionId"] for item in items if item["Key"] == full]


def _cannot_decrypt(sealed: bytes, key: str, candidates: list[bytes]) -> None:
    """Every candidate key, put in the place of the key the header names, fails authentication."""
    named = header_key_id(sealed[:200])
    assert candidates
    for candidate in candidates:
        with pytest.raises(IntegrityError):
            b"".join(decrypt_stream(Keyring({named: candidate}, named), [sealed], context=key.encode()))


@pytest.fixture
def tenant_case(make_settings, pg_target):
    """A paid tenant with a database of its own on the target (ten tickets), not yet expired."""
    tenant = f"c{uuid.uuid4().hex[:10]}"
    extra = f'[tenants.{tenant}]\nplan = "company"\ndatabase = "{tenant}"\ntarget = "main"\n'
    ctx, clock = clocked_context(make_settings(extra=extra), NOW)
    pg_target.psql(f"CREATE DATABASE {tenant}")
    pg_target.psql(
        "CREATE TABLE tickets (id int PRIMARY KEY, subject text);"
        " INSERT INTO tickets SELECT g, 'secret ticket ' || g FROM generate_series(1, 10) g",
        tenant,
    )
    yield ctx, clock, tenant
    pg_target.psql(f"DROP DATABASE IF EXISTS {tenant}")


def _purge(ctx: WorkerContext, clock, tenant: str) -> str:
    clock.now = PURGE_AFTER + timedelta(hours=1)
    return handle_purge_due(ctx, PurgeDue.new(tenant=tenant, purge_after=PURGE_AFTER))


def test_no_restore_of_a_control_database_backup_taken_before_the_purge_can_decrypt_the_tenant(
    tenant_case, control_db_odbc, key_file, tmp_path
) -> None:
    ctx, clock, tenant = tenant_case
    # Given an export of the tenant's, and its ciphertext kept aside (a download, a replica, a copy)
    handle_export_requested(
        ctx, ExportRequested.new(tenant=tenant, request_id="R1", requested_by="ann", occurred_at=NOW)
    )
    (manifest,) = exports.list_exports(tenant_repository(ctx, tenant), tenant)
    dump_key = manifest["dump_key"]
    kept = ctx.repository.store.get_bytes(dump_key)
    # And backups of the control database taken before the purge: one while active, one once expired
    database = _control_database(control_db_odbc)
    dumps = [tmp_path / "control-active.sql", tmp_path / "control-expired.sql"]
    texts = [_pg_dump(database, dumps[0])]
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))
    texts.append(_pg_dump(database, dumps[1]))
    try:
        stored_key = ctx.repository.get_json(keystore_key(tenant))["key"]
    except ObjectNotFound:
        stored_key = None  # (asserted last, so that a key kept elsewhere fails where it comes back)

    # When the tenant is purged, and then the control database is restored from each backup
    assert _purge(ctx, clock, tenant).startswith(f"purged tenant {tenant}")
    for dump in dumps:
        restored = _restore(dump)
        try:
            odbc = control_db_odbc.replace(f"DATABASE={database};", f"DATABASE={restored};")
            assert odbc != control_db_odbc
            again = WorkerContext(
                settings=ctx.settings, ledger=Ledger(odbc), repository=open_repository(ctx.settings)
            )
            # Then the tenant's key does not come back
            with pytest.raises(TenantKeyDestroyed):
                tenant_repository(again, tenant)
            with pytest.raises(TenantKeyDestroyed):
                tenant_keyring(again, tenant)
            # And nothing the restored control database and the key file hold opens the kept ciphertext
            with again.ledger.transaction() as cur:
                rows = cur.execute("SELECT kek_id, wrapped_key FROM dv_tenant_keys").fetchall()
            keys = json.loads(key_file.read_text())["keys"]
            candidates = [base64.b64decode(k) for k in keys.values()]
            for kek_id, wrapped in rows:
                try:
                    candidates.append(again.repository.keyring.unwrap(kek_id, base64.b64decode(wrapped)))
                except RepositoryError:
                    pass  # wrapped by a key this key file does not hold: it opens nothing either
            _cannot_decrypt(kept, dump_key, candidates)
            again.repository.store.put_bytes(dump_key, kept)  # the copy back where it was
            with pytest.raises(KeyNotFound):
                b"".join(again.repository.get_stream(dump_key))
            again.repository.store.delete(dump_key)
            again.ledger.close()
        finally:
            _drop(restored)

    # And the control database's backups never held the tenant's key material at all
    assert stored_key is not None
    for text in texts:
        assert _key_rows(text, tenant) == []
        assert stored_key not in text


def test_two_first_uses_of_a_tenant_key_at_once_end_with_one_key(tenant_case) -> None:
    ctx, _, tenant = tenant_case
    workers = 6
    start = threading.Barrier(workers)
    found: list[Keyring] = []
    failures: list[BaseException] = []

    def first_use() -> None:
        try:
            start.wait()
            found.append(tenant_keyring(ctx, tenant, create=True))
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert len({k.active_id for k in found}) == 1
    # What one of them encrypted, any other decrypts: it is one key, not one id
    store = ctx.repository.store
    ObjectRepository(store, found[0]).put_json(tenant_prefix(tenant) + "probe", {"n": 1})
    for keyring in found[1:]:
        assert ObjectRepository(store, keyring).get_json(tenant_prefix(tenant) + "probe") == {"n": 1}
    # Kept in the key store (one object, one version), never in the control database
    assert len(_versions(ctx, keystore_key(tenant))) == 1
    assert tenant_keyring(ctx, tenant).active_id == found[0].active_id
    assert _legacy_rows(ctx, tenant) == 0


def test_a_purge_aborts_the_multipart_uploads_left_under_the_tenants_prefix(tenant_case) -> None:
    ctx, clock, tenant = tenant_case
    tenant_repository(ctx, tenant, create=True).put_json(tenant_prefix(tenant) + "exports/e1.dv", {})
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))
    store = ctx.repository.store
    client, bucket = store.client, store.bucket
    # Uploads a dead worker left: one under the tenant's prefix, one at its key store object, and one
    # of another tenant whose name begins with this one's (which must stay)
    other = keystore_key(tenant) + "x"
    left = [tenant_prefix(tenant) + "exports/half.dump.dv", keystore_key(tenant), other]
    for key in left:
        upload = client.create_multipart_upload(Bucket=bucket, Key=store.full_key(key))["UploadId"]
        client.upload_part(
            Bucket=bucket, Key=store.full_key(key), UploadId=upload, PartNumber=1, Body=b"p" * 1024
        )
    assert len(store.multipart_uploads(tenant_prefix(tenant))) == 1
    try:
        outcome = _purge(ctx, clock, tenant)

        assert outcome.endswith("data key destroyed, 2 unfinished upload(s) aborted")
        assert store.multipart_uploads(tenant_prefix(tenant)) == []
        assert [u[0] for u in store.multipart_uploads(keystore_key(tenant))] == [other]
        assert json.loads(ctx.ledger.purge_audit(tenant)["detail"])["uploads_aborted"] == 2
    finally:
        for prefix in (tenant_prefix(tenant), keystore_key(tenant)):
            for key, upload_id, _ in store.multipart_uploads(prefix):
                store.abort_upload(key, upload_id)


def test_a_legacy_key_in_the_control_database_moves_to_the_key_store_on_first_use(
    tenant_case, control_db_odbc, tmp_path
) -> None:
    ctx, clock, tenant = tenant_case
    # Given a key and an export written by an older version (the key in the control database)
    legacy = _write_legacy_key(ctx, tenant)
    key = tenant_prefix(tenant) + "exports/old.dv"
    ObjectRepository(ctx.repository.store, legacy).put_json(key, {"export": "old"})

    # When the tenant's key is first used
    repo = tenant_repository(ctx, tenant)

    # Then the old export opens, the key is in the store, and the control database no longer holds it
    assert repo.get_json(key) == {"export": "old"}
    assert repo.keyring.active_id == legacy.active_id
    assert ctx.repository.get_json(keystore_key(tenant))["key_id"] == legacy.active_id
    assert _legacy_rows(ctx, tenant) == 0
    assert _key_rows(_pg_dump(_control_database(control_db_odbc), tmp_path / "after.sql"), tenant) == []
    # And a purge destroys it
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))
    assert "data key destroyed" in _purge(ctx, clock, tenant)
    with pytest.raises(TenantKeyDestroyed):
        tenant_repository(ctx, tenant)


def test_a_purge_destroys_a_legacy_key_never_moved(tenant_case) -> None:
    ctx, clock, tenant = tenant_case
    legacy = _write_legacy_key(ctx, tenant)
    kept = ObjectRepository(ctx.repository.store, legacy)
    kept.put_json(tenant_prefix(tenant) + "exports/old.dv", {"export": "old"})
    sealed = ctx.repository.store.get_bytes(tenant_prefix(tenant) + "exports/old.dv")
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))

    # A purge of an expired tenant does not move its key anywhere first: it destroys it
    assert "data key destroyed" in _purge(ctx, clock, tenant)

    assert _legacy_rows(ctx, tenant) == 0
    assert _versions(ctx, keystore_key(tenant)) == []
    with pytest.raises(TenantKeyDestroyed):
        tenant_repository(ctx, tenant)
    ctx.repository.store.put_bytes(tenant_prefix(tenant) + "exports/old.dv", sealed)
    with pytest.raises(KeyNotFound):
        ctx.repository.get_json(tenant_prefix(tenant) + "exports/old.dv")
    ctx.repository.store.delete(tenant_prefix(tenant) + "exports/old.dv")


@pytest.fixture
def locked_bucket(s3_endpoint):
    """A bucket of this test's own with object lock (so versioning) on; emptied and removed after."""
    name = f"dv-locked-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint.endpoint_url,
        aws_access_key_id=s3_endpoint.access_key,
        aws_secret_access_key=s3_endpoint.secret_key,
        region_name=s3_endpoint.region,
    )
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    yield name
    listed = client.list_object_versions(Bucket=name)
    for item in listed.get("Versions", []):  # a failed test may have left a legal hold on
        with contextlib.suppress(Exception):
            client.put_object_legal_hold(
                Bucket=name, Key=item["Key"], VersionId=item["VersionId"], LegalHold={"Status": "OFF"}
            )
    for item in [*listed.get("Versions", []), *listed.get("DeleteMarkers", [])]:
        client.delete_object(
            Bucket=name, Key=item["Key"], VersionId=item["VersionId"], BypassGovernanceRetention=True
        )
    client.delete_bucket(Bucket=name)


def test_a_purge_whose_key_the_store_will_not_delete_fails_loudly_and_is_never_marked_purged(
    tenant_case, locked_bucket
) -> None:
    ctx, clock, tenant = tenant_case
    settings = dataclasses.replace(
        ctx.settings, repository=dataclasses.replace(ctx.settings.repository, bucket=locked_bucket)
    )
    ctx, clock = clocked_context(settings, NOW)
    tenant_repository(ctx, tenant, create=True).put_json(tenant_prefix(tenant) + "exports/e1.dv", {})
    handle_account_expired(ctx, AccountExpired.new(tenant=tenant, plan="paid", expired_at=NOW))
    store = ctx.repository.store
    (version,) = _versions(ctx, keystore_key(tenant))
    hold = {"Bucket": locked_bucket, "Key": store.full_key(keystore_key(tenant)), "VersionId": version}
    store.client.put_object_legal_hold(**hold, LegalHold={"Status": "ON"})

    # When the purge runs, it fails naming why, and the account stays purging with the key readable
    refused = r"could not delete every version of its key object .*AccessDenied.*object lock"
    with pytest.raises(TenantKeyNotDestroyed, match=refused):
        _purge(ctx, clock, tenant)
    assert ctx.ledger.account(tenant)["status"] == "purging"
    assert ctx.ledger.purge_audit(tenant) is None
    assert tenant_keyring(ctx, tenant).active_id.startswith("tenant-")

    # Once the hold is lifted, the purge's retry completes it
    store.client.put_object_legal_hold(**hold, LegalHold={"Status": "OFF"})
    assert "data key destroyed" in _purge(ctx, clock, tenant)
    assert ctx.ledger.account(tenant)["status"] == "purged"
    assert _versions(ctx, keystore_key(tenant)) == []
