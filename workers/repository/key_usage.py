"""Which key-encryption key each stored object needs: what `deskvault keys list` shows and what
`deskvault keys retire` checks before a key leaves the key file.

Each object's header names the key that wrapped its data key (`crypto.header_key_id`), so one ranged GET
of an object's first bytes tells which key it needs, without downloading or decrypting the rest. Every
object of the repository is read this way, whatever its area (`targets/`, `servers/`, `tenants/`...):
an object whose header cannot be read (not a deskvault object, damaged, refused by the store) is
counted as unreadable and named, never skipped, since it might need any key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

from botocore.exceptions import BotoCoreError, ClientError

from workers.repository.crypto import header_key_id
from workers.repository.errors import IntegrityError, RepositoryError
from workers.repository.keyring import MAX_KEY_ID_LENGTH
from workers.repository.s3 import ListedObject, S3Store

# The header's prefix (magic, version, id length) and the longest key id: all `header_key_id` reads.
HEADER_PROBE_BYTES = 6 + MAX_KEY_ID_LENGTH
PROBE_THREADS = 8
_BATCH = 1000
_GONE = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class Unreadable:
    """An object whose header names no key: why, in words."""

    key: str
    reason: str


@dataclass
class KeyCount:
    """The objects whose data keys one key wraps: how many, their stored bytes, and per area."""

    objects: int = 0
    stored_bytes: int = 0
    areas: dict[str, int] = field(default_factory=dict)

    def add(self, area: str, size: int) -> None:
        self.objects += 1
        self.stored_bytes += size
        self.areas[area] = self.areas.get(area, 0) + 1


@dataclass
class KeyUsage:
    """Per key id named by a header, what it wraps; and the objects whose header could not be read."""

    objects: int = 0
    by_key: dict[str, KeyCount] = field(default_factory=dict)
    unreadable: list[Unreadable] = field(default_factory=list)

    def of(self, key_id: str) -> KeyCount:
        """What `key_id` wraps (nothing, if no header names it)."""
        return self.by_key.get(key_id, KeyCount())


def area_of(key: str) -> str:
    """The first component of an object key: `targets`, `servers`, `tenants`..."""
    return key.split("/", 1)[0]


def object_key_id(store: S3Store, key: str) -> str | None:
    """The id of the key an object's header names, read with a ranged GET of its first bytes; None if
    the object is gone (deleted since it was listed). IntegrityError if the header names no key,
    RepositoryError if the store refuses the read."""
    try:
        body = store.client.get_object(
            Bucket=store.bucket, Key=store.full_key(key), Range=f"bytes=0-{HEADER_PROBE_BYTES - 1}"
        )["Body"]
        try:
            first = bytes(body.read())
        finally:
            body.close()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _GONE:
            return None
        if code == "InvalidRange":  # an empty object: S3 has no first byte to give
            raise IntegrityError("the object is empty: this is not a deskvault object") from None
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise RepositoryError(f"the store refused to read its header: {code} (HTTP {status})") from None
    return header_key_id(first)


def scan(
    store: S3Store,
    *,
    threads: int = PROBE_THREADS,
    on_progress: Callable[[int, int], None] | None = None,
) -> KeyUsage:
    """Read the header of every object in the repository and count them per key id and area.

    `on_progress(done, total)` is called after each batch of objects. A failure to list, or to reach the
    store at all, raises RepositoryError: a partial count must not pass for a whole one.
    """
    listed = list(store.list_entries(""))
    usage = KeyUsage()
    total = len(listed)

    def probe(entry: ListedObject) -> tuple[ListedObject, str | None, str | None]:
        try:
            return entry, object_key_id(store, entry.key), None
        except (IntegrityError, RepositoryError) as exc:
            reason = exc.detail if isinstance(exc, IntegrityError) else str(exc)
            return entry, "", reason
        except BotoCoreError as exc:
            raise RepositoryError(
                f"could not read the header of s3://{store.bucket}/{store.prefix}{entry.key}: {exc}; "
                "check the endpoint and the network, then scan again"
            ) from None

    done = 0
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="key-usage") as pool:
        for batch in _batches(listed, _BATCH):
            for entry, key_id, reason in pool.map(probe, batch):
                if reason is not None:
                    usage.objects += 1
                    usage.unreadable.append(Unreadable(entry.key, reason))
                elif key_id is not None:
                    usage.objects += 1
                    usage.by_key.setdefault(key_id, KeyCount()).add(area_of(entry.key), entry.size)
            done += len(batch)
            if on_progress is not None:
                on_progress(done, total)
    return usage


def retire_refusal(usage: KeyUsage, key_id: str, tenant_keys: int) -> str | None:
    """Why `key_id` may not leave the key file yet, or None when nothing needs it.

    `tenant_keys` is how many tenant keys it wraps in the control database (rows older versions wrote
    into `dv_tenant_keys`; tenant keys in the repository's key store are objects, counted in `usage`).
    """
    reasons = []
    used = usage.of(key_id)
    if used.objects:
        areas = ", ".join(f"{area} {n}" for area, n in sorted(used.areas.items()))
        reasons.append(
            f"{used.objects} object(s) ({areas}) are wrapped by it: keep it until retention has expired "
            "them (backups expire, snapshot retention, export expiry), then run `deskvault keys list` again"
        )
        if "keystore" in used.areas:
            reasons.append(
                "objects under keystore/ are tenant keys, which rotation does not rewrap and retention "
                "never expires: those tenants' exports and downloadable backups need it until they are purged"
            )
    if tenant_keys:
        reasons.append(
            f"{tenant_keys} legacy tenant key(s) in the control database (dv_tenant_keys) are wrapped by it: "
            "without it those tenants' exports and downloadable backups cannot be read"
        )
    if usage.unreadable:
        shown = "; ".join(f"{u.key}: {u.reason}" for u in usage.unreadable[:5])
        more = f" and {len(usage.unreadable) - 5} more" if len(usage.unreadable) > 5 else ""
        reasons.append(
            f"{len(usage.unreadable)} object(s) have no readable header, so whether they need it is "
            f"unknown ({shown}{more}): repair or remove them (`deskvault keys list` names them all)"
        )
    if not reasons:
        return None
    return f"key {key_id!r} is still needed, so it stays in the key file: " + "; ".join(reasons)


class ScanProgress:
    """An `on_progress(done, total)` for long scans: "key usage: 1200 of 5000 objects (24%)" at most
    every `interval` seconds, and once at the end if it took that long (a small repository stays quiet)."""

    def __init__(
        self,
        emit: Callable[[str], None],
        *,
        label: str = "key usage",
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.label = label
        self.interval = interval
        self.clock = clock
        self._started = self._last = clock()
        self._spoke = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done >= total:
            if not self._spoke and now - self._started < self.interval:
                return
        elif now - self._last < self.interval:
            return
        self._last, self._spoke = now, True
        percent = 100 * done // total if total else 100
        self.emit(f"{self.label}: {done} of {total} objects ({percent}%)")


def _batches(items: Iterable[ListedObject], size: int) -> Iterator[list[ListedObject]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
