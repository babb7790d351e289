"""Objects in an S3 bucket under a key prefix; streamed multipart uploads never leave half an object."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from workers.repository.errors import AlreadyExists, ObjectNotFound, RepositoryError

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 2**20
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024
# Part sizes grow by one base size every this many parts, so 10,000 parts of a 16 MiB base reach
# ~860 GiB instead of 156 GiB, while small uploads keep small parts.
_PARTS_PER_STEP = 1000
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r} must be a non-empty string")
    if not all(" " <= c <= "~" for c in key):
        raise ValueError(f"object key {key!r} must be printable ASCII")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"object key {key!r} must not contain empty, '.' or '..' segments")
    return key


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    uploaded_at: datetime


class S3Store:
    """One bucket and key prefix; keys given to methods are relative to the prefix."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        ca_bundle: str | None = None,
        part_size: int = 16 * 2**20,
        upload_threads: int = 2,
    ) -> None:
        if not bucket:
            raise ValueError("bucket must be set")
        if prefix:
            prefix = validate_key(prefix.rstrip("/")) + "/"
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum), not {part_size}"
            )
        if upload_threads < 1:
            raise ValueError(f"upload_threads must be at least 1, not {upload_threads}")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self.upload_threads = upload_threads
        config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=max(10, upload_threads + 2),
            connect_timeout=10,
            read_timeout=120,
            # Custom endpoints (SeaweedFS, MinIO, Ceph) rarely serve virtual-host bucket names.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        # The secret goes to botocore only; this object keeps no copy, so it can't leak through repr.
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            verify=ca_bundle if ca_bundle else None,
            config=config,
        )

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}{where})"

    @property
    def client(self) -> Any:
        """The underlying boto3 client, for tests and tools that need raw access."""
        return self._client

    def full_key(self, key: str) -> str:
        """The bucket key for relative `key`."""
        full = self.prefix + validate_key(key)
        if len(full.encode()) > MAX_KEY_BYTES:
            raise ValueError(f"object key {key!r} is longer than S3's {MAX_KEY_BYTES} bytes with the prefix")
        return full

    def ensure_bucket(self) -> None:
        """Create the bucket if it doesn't exist; safe to call repeatedly and concurrently."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _NOT_FOUND | {"NoSuchBucket"}:
                self._fail(exc, "check the bucket", None)
        except BotoCoreError as exc:
            self._fail(exc, "check the bucket", None)
        extra: dict[str, Any] = {}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **extra)
        except ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":
                self._fail(exc, "create the bucket", None)
        except BotoCoreError as exc:
            self._fail(exc, "create the bucket", None)

    def bucket_exists(self) -> bool:
        """Whether the bucket is there (RepositoryError when the store cannot be asked)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND | {"NoSuchBucket"}:
                return False
            self._fail(exc, "check the bucket", None)
        except BotoCoreError as exc:
            self._fail(exc, "check the bucket", None)

    def protection(self) -> tuple[str, str]:
        """(versioning, object lock) as the bucket reports them: "Enabled", "Suspended", "off" or
        "unknown (why)" where the store refuses to say."""

        def ask(call: Callable[[], dict[str, Any]], read: Callable[[dict[str, Any]], str]) -> str:
            try:
                return read(call())
            except ClientError as exc:
                if "NotFound" in _code(exc) or _code(exc) in (
                    "NotImplemented",
                    "ObjectLockConfigurationNotFound",
                ):
                    return "off"
                return f"unknown ({_code(exc)})"
            except BotoCoreError as exc:
                return f"unknown ({type(exc).__name__})"

        versioning = ask(
            lambda: self._client.get_bucket_versioning(Bucket=self.bucket), lambda r: r.get("Status", "off")
        )
        lock = ask(
            lambda: self._client.get_object_lock_configuration(Bucket=self.bucket),
            lambda r: r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled", "off"),
        )
        return versioning, lock

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        """Store `data` at `key`; with `if_none_match`, AlreadyExists if the key is taken."""
        full = self.full_key(key)
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        with self._errors("store", key, conditional=if_none_match):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)

    def upload_stream(
        self, key: str, chunks: Iterable[bytes], *, threads: int | None = None, part_size: int | None = None
    ) -> int:
        """Store what `chunks` yields at `key` and return the byte count; on any failure nothing is stored.

        `threads`: parts in flight for this upload (default `upload_threads`); each holds a part in memory.
        `part_size`: this upload's S3 part size (default the store's; at least S3's minimum).
        """
        full = self.full_key(key)
        part_size = max(MIN_PART_SIZE, part_size or self.part_size)
        source = _Parts(chunks)
        # Grown as data arrives rather than allocated whole: most objects are far smaller than a part.
        first = source.take(part_size)
        filled = len(first)
        if filled < part_size:
            with self._errors("store", key):
                self._client.put_object(Bucket=self.bucket, Key=full, Body=first)
            return filled
        with self._errors("start a multipart upload of", key):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        try:
            in_flight = threads or self.upload_threads
            total, etags = self._upload_parts(key, full, upload_id, first, source, in_flight, part_size)
            with self._errors("complete the upload of", key):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
                )
        except BaseException:
            # BaseException too: a KeyboardInterrupt or a closed generator must not leave parts behind.
            self._abort(full, upload_id)
            raise
        return total

    def _upload_parts(
        self, key: str, full: str, upload_id: str, first: bytearray, source: _Parts, threads: int,
        part_size: int,
    ) -> tuple[int, list[str]]:  # fmt: skip
        etags: list[str] = []
        total = 0
        number = 1
        part = first
        spare: list[bytearray] = []
        pending: deque[tuple[Future[str], bytearray]] = deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="s3-upload") as pool:
            try:
                while part:
                    if number > MAX_PARTS:
                        raise RepositoryError(
                            f"s3://{self.bucket}/{full} needs more than {MAX_PARTS} parts; "
                            "raise part_size and try again"
                        )
                    total += len(part)
                    pending.append((pool.submit(self._upload_part, key, full, upload_id, number, part), part))
                    if len(part) < _part_size_for(part_size, number):
                        break
                    number += 1
                    # `threads` parts in flight plus the one being filled bound the memory.
                    while len(pending) > threads:
                        future, used = pending.popleft()
                        etags.append(future.result())
                        spare.append(used)
                    size = _part_size_for(part_size, number)
                    part = spare.pop() if spare and len(spare[-1]) == size else bytearray(size)
                    filled = source.fill(part)
                    if filled < size:
                        # The last part: shrinking it is safe because it is never reused.
                        del part[filled:]
                while pending:
                    etags.append(pending.popleft()[0].result())
            except BaseException:
                # Queued parts are dropped; the pool's exit waits for running ones, so the abort that
                # follows can't race a part upload.
                for future, _ in pending:
                    future.cancel()
                raise
        return total, etags

    def _upload_part(self, key: str, full: str, upload_id: str, number: int, data: bytearray) -> str:
        with self._errors(f"upload part {number} of", key):
            response = self._client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
            )
        return str(response["ETag"])

    def multipart_uploads(self, prefix: str) -> list[tuple[str, str, datetime]]:
        """Unfinished multipart uploads under `prefix`: (relative key, upload id, when started)."""
        found = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._errors("list the multipart uploads of", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for upload in page.get("Uploads", ()):
                    found.append((upload["Key"][len(self.prefix) :], upload["UploadId"], upload["Initiated"]))
        return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._errors("abort the multipart upload of", key):
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id
            )

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # The original failure matters more; a lifecycle rule for incomplete uploads cleans up the rest.
            log.warning(
                "could not abort multipart upload %s of s3://%s/%s: %s", upload_id, self.bucket, full, exc
            )

    def get_bytes(self, key: str) -> bytes:
        """The whole object at `key`."""
        full = self.full_key(key)
        with self._errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def download_stream(self, key: str, chunk_size: int = 8 * 2**20) -> Iterator[bytes]:
        """The object at `key` in chunks of up to `chunk_size` bytes."""
        full = self.full_key(key)
        with self._errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        try:
            while True:
                with self._errors("read", key):
                    chunk = body.read(chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        """The stored size in bytes of the object at `key`."""
        full = self.full_key(key)
        with self._errors("look up", key):
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Relative keys starting with `prefix`, in S3's (lexicographic) order."""
        return (entry.key for entry in self.list_entries(prefix))

    def list_entries(self, prefix: str = "") -> Iterator[ListedObject]:
        """Relative keys starting with `prefix` with their stored size and upload time, in key order."""
        if prefix:
            # Checked as if a key followed, so partial names ("2026-1") and folders ("db/") both pass.
            validate_key(prefix + "x")
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("list", prefix or "(all)"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield ListedObject(item["Key"][len(self.prefix) :], item["Size"], item["LastModified"])

    def delete(self, key: str) -> None:
        """Remove the object at `key`; deleting a missing key is not an error."""
        full = self.full_key(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def delete_everything(self, prefix: str) -> int:
        """Remove every object under `prefix`, every version and delete marker too; returns how many.

        In a versioned bucket a plain delete only hides an object behind a delete marker; a purge must
        leave nothing to restore.
        """
        validate_key(prefix + "x")
        removed = 0
        paginator = self._client.get_paginator("list_object_versions")
        with self._errors("list versions of", prefix):
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix))
        for page in pages:
            for item in [*page.get("Versions", ()), *page.get("DeleteMarkers", ())]:
                with self._errors("delete", item["Key"][len(self.prefix) :]):
                    self._client.delete_object(
                        Bucket=self.bucket, Key=item["Key"], VersionId=item["VersionId"]
                    )
                removed += 1
        return removed

    def object_versions(self, key: str) -> list[str]:
        """The version ids of exactly `key`, versions and delete markers ("null" in an unversioned bucket).

        Listed by prefix, kept only where the key matches, so `a/b` never reaches `a/bc`.
        """
        full = self.full_key(key)
        found = []
        paginator = self._client.get_paginator("list_object_versions")
        with self._errors("list versions of", key):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in [*page.get("Versions", ()), *page.get("DeleteMarkers", ())]:
                    if item["Key"] == full:
                        found.append(str(item["VersionId"]))
        return found

    def delete_every_version(self, key: str) -> int:
        """Remove every version and delete marker of exactly `key`; returns how many there were."""
        full = self.full_key(key)
        versions = self.object_versions(key)
        for version in versions:
            with self._errors(f"delete version {version} of", key):
                self._client.delete_object(Bucket=self.bucket, Key=full, VersionId=version)
        return len(versions)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None, *, conditional: bool = False) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            if conditional and (_code(exc) in _CONFLICT or _status(exc) in (409, 412)):
                raise AlreadyExists(
                    f"s3://{self.bucket}/{self.prefix}{key} already exists; it was not overwritten"
                ) from exc
            self._fail(exc, action, key)
        except BotoCoreError as exc:
            self._fail(exc, action, key)

    def _fail(self, exc: Exception, action: str, key: str | None) -> NoReturn:
        where = f"s3://{self.bucket}/{self.prefix}{key}" if key is not None else f"bucket {self.bucket!r}"
        endpoint = self.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in _NOT_FOUND:
                raise ObjectNotFound(f"{where} does not exist; check the key and the prefix") from exc
            if code == "NoSuchBucket":
                raise RepositoryError(
                    f"could not {action} {where}: bucket {self.bucket!r} does not exist at {endpoint}; "
                    "check [repository] bucket, or create it with `deskvault init`"
                ) from exc
            if code in _DENIED or status == 403:
                raise RepositoryError(
                    f"could not {action} {where}: {endpoint} refused the credentials ({code}); "
                    "check the access key, secret key and the bucket policy"
                ) from exc
            raise RepositoryError(
                f"could not {action} {where}: {code} (HTTP {status}) from {endpoint}"
            ) from exc
        if isinstance(exc, EndpointConnectionError):
            raise RepositoryError(
                f"could not {action} {where}: cannot connect to {endpoint}; "
                "check the endpoint URL and that the S3 service is running"
            ) from exc
        if isinstance(exc, NoCredentialsError):
            raise RepositoryError(
                f"could not {action} {where}: no S3 credentials; set the access key and secret key"
            ) from exc
        raise RepositoryError(
            f"could not {action} {where} at {endpoint}: {exc}; check the endpoint and the network"
        ) from exc


def _part_size_for(base: int, number: int) -> int:
    """Part `number`'s size: `base`, growing every _PARTS_PER_STEP parts so big objects fit S3's limit."""
    return base * (1 + (number - 1) // _PARTS_PER_STEP)


class _Parts:
    """Cuts an iterable of byte chunks into exactly sized parts, copying each byte once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._rest = memoryview(b"")

    def take(self, limit: int) -> bytearray:
        """Up to `limit` bytes from the chunks, fewer only at the end."""
        out = bytearray()
        while len(out) < limit:
            if not self._rest:
                self._rest = memoryview(b"")
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._rest = memoryview(chunk).cast("B")
            take = min(limit - len(out), len(self._rest))
            out += self._rest[:take]
            self._rest = self._rest[take:]
        return out

    def fill(self, part: bytearray) -> int:
        """Fill `part` from the chunks; returns the bytes written, fewer than len(part) only at the end."""
        out = memoryview(part)
        filled, size = 0, len(part)
        try:
            while filled < size:
                if not self._rest:
                    # Drop the view before asking for more: a producer may resize the buffer it gave us.
                    self._rest = memoryview(b"")
                    chunk = next(self._chunks, None)
                    if chunk is None:
                        return filled
                    self._rest = memoryview(chunk).cast("B")
                take = min(size - filled, len(self._rest))
                out[filled : filled + take] = self._rest[:take]
                self._rest = self._rest[take:]
                filled += take
            return filled
        finally:
            out.release()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
