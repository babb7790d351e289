"""The object repository the rest of deskvault uses: plaintext in, zstd + AES-GCM + S3 underneath."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from workers.repository import fencing
from workers.repository.crypto import DEFAULT_FRAME_SIZE, decrypt_stream, encrypt_stream
from workers.repository.errors import AlreadyExists, IntegrityError, RepositoryError
from workers.repository.keyring import Keyring
from workers.repository.s3 import S3Store, validate_key
from workers.repository.streams import ChunkReader, prefetched

# Decompressed output is handed out in pieces of at most this size, whatever the compression ratio.
_OUTPUT_PIECE = 2**20


@dataclass(frozen=True)
class StoredObject:
    """What was stored: sizes before and after compression + encryption, plaintext SHA-256, key id."""

    key: str
    plain_size: int
    stored_size: int
    sha256: str
    key_id: str


class ObjectRepository:
    """Compressed, encrypted objects in an S3 store; nothing reaches the bucket in plaintext."""

    def __init__(
        self,
        store: S3Store,
        keyring: Keyring,
        *,
        zstd_level: int = 3,
        zstd_threads: int = 0,
        frame_size: int = DEFAULT_FRAME_SIZE,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.zstd_level = zstd_level
        self.zstd_threads = zstd_threads
        self.frame_size = frame_size

    def __repr__(self) -> str:
        return f"ObjectRepository({self.store!r}, {self.keyring!r}, zstd_level={self.zstd_level})"

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        on_progress: Callable[[int], None] | None = None,
        zstd_threads: int | None = None,
        upload_threads: int | None = None,
        part_size: int | None = None,
    ) -> StoredObject:
        """Compress, encrypt and upload `chunks`; on any failure (the source's too) nothing is stored.

        `zstd_threads`, `upload_threads` and `part_size` (of the S3 upload) override the repository's for
        this object (1: in this thread; one part in flight), for callers that already run one upload per
        core and so hold several objects' parts in memory at once.
        """
        validate_key(key)
        fence = fencing.current()
        fence()
        hasher = hashlib.sha256()
        plain_size = 0

        def measured() -> Iterator[bytes]:
            nonlocal plain_size
            for chunk in chunks:
                fence()  # a job that lost its lease stops here, and the upload is aborted
                hasher.update(chunk)
                plain_size += len(chunk)
                if on_progress is not None:
                    on_progress(plain_size)
                yield chunk

        key_id = self.keyring.active_id
        # Reading and hashing run a few chunks ahead in their own thread, off the compressing thread.
        sealed = encrypt_stream(
            self.keyring,
            self._compressed(prefetched(measured()), zstd_threads),
            self.frame_size,
            context=key.encode(),
        )
        stored_size = self.store.upload_stream(key, sealed, threads=upload_threads, part_size=part_size)
        return StoredObject(key, plain_size, stored_size, hasher.hexdigest(), key_id)

    def get_stream(
        self, key: str, *, expect_sha256: str | None = None, expect_size: int | None = None
    ) -> Iterator[bytes]:
        """Download, decrypt and decompress `key`; with expectations, IntegrityError at the end on mismatch.

        Everything yielded is untrusted until the iterator finishes without raising.
        """
        validate_key(key)
        # The download runs a couple of chunks ahead in its own thread, off the decrypting thread.
        sealed = prefetched(self.store.download_stream(key), depth=2)
        return self._opened(key, sealed, expect_sha256, expect_size)

    def put_json(self, key: str, obj: object, *, if_none_match: bool = False) -> StoredObject:
        """Store a small JSON document, compressed and encrypted; AlreadyExists if `if_none_match` loses."""
        validate_key(key)
        plain = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        key_id = self.keyring.active_id
        fencing.current()()
        sealed = b"".join(
            encrypt_stream(
                self.keyring, [self._compressor().compress(plain)], self.frame_size, context=key.encode()
            )
        )
        self.store.put_bytes(key, sealed, if_none_match=if_none_match)
        return StoredObject(key, len(plain), len(sealed), hashlib.sha256(plain).hexdigest(), key_id)

    def commit_json(self, key: str, document: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Write a commit point once: (the document, True), or (the one already there, False).

        Two deliveries that raced past the ledger both get here; the first write wins and both go on
        with the same document.
        """
        try:
            self.put_json(key, document, if_none_match=True)
        except AlreadyExists:
            existing = self.get_json(key)
            if not isinstance(existing, dict):
                raise IntegrityError("it decrypted fine but is not a JSON object", key) from None
            return existing, False
        return document, True

    def get_json(self, key: str) -> object:
        """A document stored by `put_json`."""
        validate_key(key)
        plain = b"".join(self._opened(key, [self.store.get_bytes(key)], None, None))
        try:
            return json.loads(plain)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryError(
                f"object {key!r} decrypted fine but is not a JSON document ({exc}); "
                "it was stored with put_stream, read it with get_stream"
            ) from None

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""
        return self.store.exists(key)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix`."""
        return self.store.list_keys(prefix)

    def delete(self, key: str) -> None:
        """Remove the object at `key` (no error if it is missing)."""
        fencing.current()()
        self.store.delete(key)

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload under `prefix`; returns how many there were.

        For a caller holding a job's lease: uploads under its job's keys were left by an attempt that died.
        """
        uploads = self.store.multipart_uploads(prefix)
        for key, upload_id, _ in uploads:
            self.store.abort_upload(key, upload_id)
        return len(uploads)

    def _compressor(self, threads: int | None = None) -> zstandard.ZstdCompressor:
        # A context per operation: zstandard contexts must not be shared between threads.
        # The content checksum catches corruption that happened before encryption. zstd's threads
        # count 1 as one worker beside the caller; 0 compresses in the calling thread.
        workers = self.zstd_threads if threads is None else (0 if threads <= 1 else threads)
        return zstandard.ZstdCompressor(level=self.zstd_level, threads=workers, write_checksum=True)

    def _compressed(self, chunks: Iterable[bytes], threads: int | None = None) -> Iterator[bytes]:
        compressor = self._compressor(threads).compressobj()
        for chunk in chunks:
            out = compressor.compress(chunk)
            if out:
                yield out
        yield compressor.flush()

    def _opened(
        self, key: str, sealed: Iterable[bytes], expect_sha256: str | None, expect_size: int | None
    ) -> Iterator[bytes]:
        # AES-GCM and zstd's checksum already catch damage; the SHA-256 is an end-to-end check against
        # the manifest, and costs a core-second per GiB, so it is computed only when one is expected.
        hasher = hashlib.sha256() if expect_sha256 is not None else None
        size = 0
        reader = ChunkReader(decrypt_stream(self.keyring, sealed, context=key.encode()))
        pieces = zstandard.ZstdDecompressor().read_to_iter(reader, write_size=_OUTPUT_PIECE)
        try:
            for piece in pieces:
                if hasher is not None:
                    hasher.update(piece)
                size += len(piece)
                yield piece
        except IntegrityError as exc:
            raise exc.for_key(key) from None
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"the decrypted data is not valid zstd ({exc})", key) from None
        if expect_size is not None and size != expect_size:
            raise IntegrityError(f"it holds {size} bytes, not the expected {expect_size}", key)
        if hasher is not None and expect_sha256 is not None and hasher.hexdigest() != expect_sha256.lower():
            raise IntegrityError(
                f"its SHA-256 is {hasher.hexdigest()}, not the expected {expect_sha256}", key
            )
