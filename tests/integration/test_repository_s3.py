"""The object repository against a real S3 (local SeaweedFS): multipart, aborts, conditions, tampering."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from botocore.exceptions import EndpointConnectionError

from workers.repository.errors import AlreadyExists, IntegrityError, ObjectNotFound, RepositoryError
from workers.repository.keyring import Keyring
from workers.repository.objects import ObjectRepository
from workers.repository.s3 import S3Store

pytestmark = pytest.mark.integration

MIB = 2**20
MARKER = b"ticket-body:CONFIDENTIAL-7f3a9c"


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.create(tmp_path / "keys.json")


@pytest.fixture
def repo(s3_store: S3Store, keyring: Keyring) -> ObjectRepository:
    return ObjectRepository(s3_store, keyring, frame_size=MIB)


def random_ish(total: int, seed: int = 7) -> Iterator[bytes]:
    """1 MiB chunks, half random and half repetitive text, so zstd helps but can't make it small."""
    rnd = random.Random(seed)
    text = (MARKER + b" the printer on floor 3 is out of toner again\n") * 20_000
    made = 0
    while made < total:
        chunk = rnd.randbytes(MIB // 2) + text[: MIB // 2]
        chunk = chunk[: total - made]
        made += len(chunk)
        yield chunk


def raw(store: S3Store, key: str) -> bytes:
    return store.client.get_object(Bucket=store.bucket, Key=store.full_key(key))["Body"].read()


def open_uploads(store: S3Store) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])


def test_multipart_round_trip(repo: ObjectRepository, s3_store: S3Store) -> None:
    total = 40 * MIB
    expected = hashlib.sha256(b"".join(random_ish(total))).hexdigest()
    progress: list[int] = []

    stored = repo.put_stream("db/acme/base.dump", random_ish(total), on_progress=progress.append)

    assert stored.plain_size == total
    assert stored.sha256 == expected
    assert stored.key_id == repo.keyring.active_id
    assert 5 * MIB < stored.stored_size < total  # compressed, yet more than one part
    assert s3_store.size("db/acme/base.dump") == stored.stored_size
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=s3_store.full_key("db/acme/base.dump"))
    assert re.fullmatch(r'"?[0-9a-f]{32}-\d+"?', head["ETag"])  # a multipart upload's ETag
    assert progress == sorted(progress) and progress[-1] == total

    hasher, size = hashlib.sha256(), 0
    for piece in repo.get_stream("db/acme/base.dump", expect_sha256=stored.sha256, expect_size=total):
        assert len(piece) <= MIB
        hasher.update(piece)
        size += len(piece)
    assert (size, hasher.hexdigest()) == (total, expected)
    assert not open_uploads(s3_store)


@pytest.mark.parametrize("size", [0, 1, 5 * MIB - 1, 5 * MIB, 10 * MIB, 10 * MIB + 1])
def test_upload_stream_sizes_around_the_part_size(s3_store: S3Store, size: int) -> None:
    data = random.Random(size).randbytes(size)
    chunks = [data[i : i + 777_777] for i in range(0, size, 777_777)]

    stored = s3_store.upload_stream("blob", chunks)

    assert stored == size == s3_store.size("blob")
    assert s3_store.get_bytes("blob") == data
    assert b"".join(s3_store.download_stream("blob", chunk_size=3 * MIB)) == data
    assert not open_uploads(s3_store)


def test_an_upload_with_parts_of_its_own_size_stores_them_so_and_reads_back_whole(s3_store: S3Store) -> None:
    data = random.Random(7).randbytes(17 * MIB + 3)
    stored = s3_store.upload_stream("blob-small-parts", [data[i : i + MIB] for i in range(0, len(data), MIB)],
                                    part_size=6 * MIB, threads=1)  # fmt: skip
    assert stored == len(data)
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=s3_store.full_key("blob-small-parts"),
                                       PartNumber=1)  # fmt: skip
    assert head["ContentLength"] == 6 * MIB and head["PartsCount"] == 3
    assert s3_store.get_bytes("blob-small-parts") == data
    assert not open_uploads(s3_store)


def test_failing_source_leaves_no_object_and_no_upload(repo: ObjectRepository, s3_store: S3Store) -> None:
    def source() -> Iterator[bytes]:
        yield from random_ish(24 * MIB)
        raise RuntimeError("the database dump broke")

    with pytest.raises(RuntimeError, match="dump broke"):
        repo.put_stream("db/acme/broken.dump", source())

    assert not repo.exists("db/acme/broken.dump")
    assert not open_uploads(s3_store)
    assert list(repo.list_keys()) == []


def test_failing_part_upload_aborts(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real = s3_store.client.upload_part

    def flaky(**kwargs: object) -> dict:
        if kwargs["PartNumber"] == 2:
            raise s3_store.client.exceptions.NoSuchUpload(
                {"Error": {"Code": "NoSuchUpload", "Message": "gone"}}, "UploadPart"
            )
        return real(**kwargs)

    monkeypatch.setattr(s3_store.client, "upload_part", flaky)

    with pytest.raises(RepositoryError, match=r"upload part 2 of s3://deskvault-test/t-\w+/blob"):
        s3_store.upload_stream("blob", (bytes(MIB) for _ in range(16)))

    assert not s3_store.exists("blob")
    assert not open_uploads(s3_store)


def test_conditional_put_json_refuses_to_overwrite(repo: ObjectRepository) -> None:
    first = repo.put_json("manifests/2026-11-28.json", {"run": 1}, if_none_match=True)

    with pytest.raises(AlreadyExists, match=r"manifests/2026-11-28\.json already exists"):
        repo.put_json("manifests/2026-11-28.json", {"run": 2}, if_none_match=True)

    assert repo.get_json("manifests/2026-11-28.json") == {"run": 1}
    assert first.plain_size == len(b'{"run":1}')


def test_nothing_in_the_bucket_is_plaintext(repo: ObjectRepository, s3_store: S3Store) -> None:
    repo.put_stream("db/acme/small.dump", [MARKER * 1000])
    repo.put_stream("db/acme/big.dump", random_ish(8 * MIB))
    repo.put_json("manifests/m.json", {"note": MARKER.decode(), "tables": ["tickets"]})

    for key in ("db/acme/small.dump", "db/acme/big.dump", "manifests/m.json"):
        stored = raw(s3_store, key)
        assert stored.startswith(b"DVLT")
        assert MARKER not in stored
        assert b"tickets" not in stored
    assert repo.get_json("manifests/m.json") == {"note": MARKER.decode(), "tables": ["tickets"]}


def test_wrong_expectations_fail_at_the_end(repo: ObjectRepository) -> None:
    stored = repo.put_stream("db/x.dump", [b"row\n" * 1000])

    with pytest.raises(IntegrityError, match=r"object 'db/x.dump'.*SHA-256"):
        list(repo.get_stream("db/x.dump", expect_sha256="0" * 64))
    with pytest.raises(IntegrityError, match="not the expected 3999"):
        list(repo.get_stream("db/x.dump", expect_size=3999))
    assert b"".join(repo.get_stream("db/x.dump", expect_sha256=stored.sha256.upper())) == b"row\n" * 1000


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_modified_object_is_detected(repo: ObjectRepository, s3_store: S3Store, where: str) -> None:
    repo.put_stream("db/t.dump", random_ish(3 * MIB))
    stored = bytearray(raw(s3_store, "db/t.dump"))
    position = {"header": 30, "middle": len(stored) // 2, "end": len(stored) - 1}[where]
    stored[position] ^= 0x01
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=s3_store.full_key("db/t.dump"), Body=bytes(stored))

    with pytest.raises(IntegrityError, match=r"object 'db/t\.dump' failed its integrity check"):
        for _ in repo.get_stream("db/t.dump"):
            pass


def test_truncated_object_and_json_are_detected(repo: ObjectRepository, s3_store: S3Store) -> None:
    repo.put_stream("db/t.dump", random_ish(3 * MIB))
    repo.put_json("m.json", {"a": 1})
    for key in ("db/t.dump", "m.json"):
        stored = raw(s3_store, key)
        s3_store.put_bytes(key, stored[: len(stored) - 10])

    with pytest.raises(IntegrityError, match="truncated"):
        list(repo.get_stream("db/t.dump"))
    with pytest.raises(IntegrityError, match=r"object 'm\.json'"):
        repo.get_json("m.json")


def test_missing_object(repo: ObjectRepository, s3_store: S3Store) -> None:
    with pytest.raises(ObjectNotFound, match="nothing/here does not exist"):
        list(repo.get_stream("nothing/here"))
    with pytest.raises(ObjectNotFound):
        s3_store.size("nothing/here")
    assert not repo.exists("nothing/here")
    repo.delete("nothing/here")  # deleting what isn't there is fine


def test_list_keys_is_relative_and_filtered(repo: ObjectRepository) -> None:
    for key in ("db/a/1", "db/a/2", "db/b/1", "manifests/x.json"):
        repo.put_json(key, {})

    assert sorted(repo.list_keys()) == ["db/a/1", "db/a/2", "db/b/1", "manifests/x.json"]
    assert sorted(repo.list_keys("db/a/")) == ["db/a/1", "db/a/2"]
    assert list(repo.list_keys("db/c")) == []
    repo.delete("db/a/1")
    assert sorted(repo.list_keys("db/")) == ["db/a/2", "db/b/1"]


def test_ensure_bucket_is_idempotent(s3_store: S3Store) -> None:
    s3_store.ensure_bucket()
    s3_store.ensure_bucket()


def test_bad_credentials_are_explained(s3_store: S3Store) -> None:
    wrong = S3Store(
        bucket=s3_store.bucket,
        endpoint_url=s3_store.endpoint_url,
        access_key="nobody",
        secret_key="s3cr3t-xyz",
    )

    with pytest.raises(RepositoryError, match=r"refused the credentials.*check the access key") as info:
        wrong.get_bytes("x")

    assert "s3cr3t-xyz" not in str(info.value)
    assert "s3cr3t-xyz" not in repr(wrong)


def test_unreachable_endpoint_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    store = S3Store(bucket="b", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="s")

    def refused(**kwargs: object) -> dict:
        # What botocore raises once its retries are spent; waiting for them would take seconds.
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/x")

    monkeypatch.setattr(store.client, "head_object", refused)

    with pytest.raises(
        RepositoryError, match=r"cannot connect to http://127\.0\.0\.1:9; check the endpoint URL"
    ):
        store.exists("x")


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "a/../b", "a/..", "/abs", "a//b", "a/", "", "./a", "tab\there", "caf\u00e9"]
)
def test_unsafe_keys_are_rejected(repo: ObjectRepository, s3_store: S3Store, key: str) -> None:
    with pytest.raises(ValueError, match="object key"):
        repo.put_stream(key, [b"x"])
    with pytest.raises(ValueError, match="object key"):
        repo.get_stream(key)
    with pytest.raises(ValueError, match="object key"):
        repo.put_json(key, {})
    with pytest.raises(ValueError, match="object key"):
        s3_store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="object key"):
        s3_store.delete(key)
    assert list(repo.list_keys()) == []


def test_repr_hides_the_secret(s3_store: S3Store, s3_endpoint: object) -> None:
    assert s3_endpoint.secret_key not in repr(s3_endpoint)  # type: ignore[attr-defined]
    assert s3_endpoint.secret_key not in repr(s3_store)  # type: ignore[attr-defined]


def test_an_object_copied_to_another_key_is_refused(repo: ObjectRepository, s3_store: S3Store) -> None:
    # Given two backups' manifests, when someone with bucket access swaps one for the other
    repo.put_json("backups/a/manifest.dv", {"backup": "a"})
    repo.put_json("backups/b/manifest.dv", {"backup": "b"})
    s3_store.put_bytes("backups/b/manifest.dv", s3_store.get_bytes("backups/a/manifest.dv"))

    # Then reading it at its new key fails authentication instead of returning the wrong backup
    with pytest.raises(IntegrityError):
        repo.get_json("backups/b/manifest.dv")
    assert repo.get_json("backups/a/manifest.dv") == {"backup": "a"}


def test_delete_everything_leaves_no_version_in_a_versioned_bucket(s3_endpoint) -> None:
    # A bucket of this test's own with versioning on, as a production bucket may well have.
    store = S3Store(
        bucket=f"dv-versioned-{uuid4().hex[:8]}",
        endpoint_url=s3_endpoint.endpoint_url,
        access_key=s3_endpoint.access_key,
        secret_key=s3_endpoint.secret_key,
        region=s3_endpoint.region,
    )
    store.ensure_bucket()
    store.client.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    store.put_bytes("tenants/t1/exports/a", b"first")
    store.put_bytes("tenants/t1/exports/a", b"second")  # a newer version over the first
    store.put_bytes("tenants/t1/exports/b", b"gone soon")
    store.delete("tenants/t1/exports/b")  # only a delete marker hides it
    store.put_bytes("tenants/t2/keep", b"another tenant's")

    def versions(prefix: str) -> list:
        listed = store.client.list_object_versions(Bucket=store.bucket, Prefix=prefix)
        return [*listed.get("Versions", []), *listed.get("DeleteMarkers", [])]

    assert len(versions("tenants/t1/")) == 4
    assert store.delete_everything("tenants/t1/") == 4
    assert versions("tenants/t1/") == []
    assert store.get_bytes("tenants/t2/keep") == b"another tenant's"
    store.delete_everything("tenants/t2/")
    store.client.delete_bucket(Bucket=store.bucket)
