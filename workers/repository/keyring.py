"""Key-encryption keys kept in a local JSON key file; they wrap the per-object data keys."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workers.repository.errors import IntegrityError, KeyFileError, KeyNotFound

KEY_BYTES = 32
NONCE_BYTES = 12
MAX_KEY_ID_LENGTH = 64
# Binds a wrapped key to the id of the key that wrapped it, so a wrapped key can't be relabelled.
_AAD_PREFIX = b"deskvault-kek-v1:"


def valid_key_id(key_id: str) -> bool:
    """Whether `key_id` is 1-64 printable ASCII characters without spaces."""
    return 0 < len(key_id) <= MAX_KEY_ID_LENGTH and all("!" <= c <= "~" for c in key_id)


class Keyring:
    """Loaded key-encryption keys and the id of the one that wraps new data keys."""

    def __init__(self, keys: Mapping[str, bytes], active_id: str, source: Path | None = None) -> None:
        if active_id not in keys:
            raise KeyNotFound(active_id, str(source) if source else None)
        for key_id, key in keys.items():
            if not valid_key_id(key_id) or len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} must have a 1-64 character ASCII id and {KEY_BYTES} bytes")
        self._ciphers = {key_id: AESGCM(bytes(key)) for key_id, key in keys.items()}
        self._active_id = active_id
        self._source = source
        # Derived from the oldest key, which rotation keeps: stable names for deduplicated chunks.
        oldest = min(keys)
        self._naming_key = hmac.new(bytes(keys[oldest]), b"deskvault-chunk-names-v1", hashlib.sha256).digest()

    @property
    def active_id(self) -> str:
        """The id of the key that wraps new data keys."""
        return self._active_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of every loaded key, oldest first."""
        return tuple(sorted(self._ciphers))

    def __repr__(self) -> str:
        return f"Keyring(active_id={self._active_id!r}, key_ids={list(self.key_ids)!r})"

    def content_id(self, data: bytes) -> str:
        """A keyed hash naming `data` (for deduplication) that reveals nothing to who lacks the keys."""
        return hmac.new(self._naming_key, data, hashlib.sha256).hexdigest()

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """Encrypt `data_key` under the active key; returns the key id and nonce + ciphertext + tag."""
        nonce = os.urandom(NONCE_BYTES)
        wrapped = self._ciphers[self._active_id].encrypt(nonce, data_key, _aad(self._active_id))
        return self._active_id, nonce + wrapped

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """Decrypt a data key wrapped by `wrap`; KeyNotFound if `key_id` is not loaded."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise KeyNotFound(key_id, str(self._source) if self._source else None)
        if len(wrapped) <= NONCE_BYTES:
            raise IntegrityError(f"the wrapped data key is too short ({len(wrapped)} bytes)")
        try:
            return cipher.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _aad(key_id))
        except InvalidTag:
            raise IntegrityError(f"the data key wrapped under key {key_id!r} failed authentication") from None

    @classmethod
    def load(cls, path: Path | str) -> Keyring:
        """Read a key file written by `create` or `rotate`."""
        path = Path(path)
        active_id, keys = _read(path)
        if active_id not in keys:
            raise KeyFileError(
                f"key file {path}: the active key {active_id!r} is not among its keys "
                f"{sorted(keys)}; restore the file from its backup"
            )
        return cls(keys, active_id, path)

    @classmethod
    def create(cls, path: Path | str) -> Keyring:
        """Write a new key file holding one fresh key; refuses to replace an existing file."""
        path = Path(path)
        key_id = _new_key_id(set())
        keys = {key_id: os.urandom(KEY_BYTES)}
        _write(path, key_id, keys, replace=False)
        return cls(keys, key_id, path)

    @classmethod
    def rotate(cls, path: Path | str) -> str:
        """Add a fresh key to the key file and make it active; old keys stay so old objects still open."""
        path = Path(path)
        _active, keys = _read(path)
        key_id = _new_key_id(set(keys))
        keys[key_id] = os.urandom(KEY_BYTES)
        _write(path, key_id, keys, replace=True)
        return key_id


def _aad(key_id: str) -> bytes:
    return _AAD_PREFIX + key_id.encode("ascii")


def _new_key_id(taken: set[str]) -> str:
    base = datetime.now(UTC).strftime("k%Y%m%dT%H%M%SZ")
    key_id, n = base, 1
    # Two rotations within one second would otherwise produce the same id.
    while key_id in taken:
        n += 1
        key_id = f"{base}-{n}"
    return key_id


def _read(path: Path) -> tuple[str, dict[str, bytes]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist; create one with Keyring.create or point to the right file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} could not be read: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # The position only: the text holds key material.
        raise KeyFileError(
            f"key file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}); "
            "restore it from its backup"
        ) from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("active"), str)
        or not isinstance(doc.get("keys"), dict)
    ):
        raise KeyFileError(f'key file {path} must hold {{"active": "<id>", "keys": {{"<id>": "<base64>"}}}}')
    keys: dict[str, bytes] = {}
    for key_id, encoded in doc["keys"].items():
        if not valid_key_id(key_id):
            raise KeyFileError(f"key file {path}: key id {key_id!r} must be 1-64 printable ASCII characters")
        try:
            key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except binascii.Error:
            key = b""
        if len(key) != KEY_BYTES:
            raise KeyFileError(
                f"key file {path}: key {key_id!r} must be the base64 of {KEY_BYTES} bytes; "
                "restore the file from its backup"
            )
        keys[key_id] = key
    return doc["active"], keys


def _write(path: Path, active_id: str, keys: Mapping[str, bytes], *, replace: bool) -> None:
    doc = {"active": active_id, "keys": {k: base64.b64encode(v).decode("ascii") for k, v in keys.items()}}
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            # link() fails if the target exists, so a concurrent create can't be overwritten.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(
                    f"key file {path} already exists; refusing to overwrite it (use rotate to add a key)"
                ) from None
            os.unlink(tmp)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
