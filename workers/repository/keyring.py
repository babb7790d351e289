"""Key-encryption keys kept in a local JSON key file; they wrap the per-object data keys."""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
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
# How key files from before the `chunk_naming` field derived the chunk-naming key from their oldest key.
_LEGACY_NAMING_LABEL = b"deskvault-chunk-names-v1"
# Any of these mode bits lets someone other than the owner read or change the keys.
_SHARED_MODE_BITS = 0o077


def valid_key_id(key_id: str) -> bool:
    """Whether `key_id` is 1-64 printable ASCII characters without spaces."""
    return 0 < len(key_id) <= MAX_KEY_ID_LENGTH and all("!" <= c <= "~" for c in key_id)


class Keyring:
    """Loaded key-encryption keys and the id of the one that wraps new data keys."""

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active_id: str,
        source: Path | None = None,
        *,
        chunk_naming: bytes | None = None,
    ) -> None:
        if active_id not in keys:
            raise KeyNotFound(active_id, str(source) if source else None)
        for key_id, key in keys.items():
            if not valid_key_id(key_id) or len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} must have a 1-64 character ASCII id and {KEY_BYTES} bytes")
        if chunk_naming is not None and len(chunk_naming) != KEY_BYTES:
            raise ValueError(f"the chunk-naming key must have {KEY_BYTES} bytes")
        self._ciphers = {key_id: AESGCM(bytes(key)) for key_id, key in keys.items()}
        self._active_id = active_id
        self._source = source
        # The key of deduplicated chunk names: a key of its own, so that no key-encryption key, the
        # oldest included, is needed to name or check a chunk (see `_naming_key_of`).
        self._naming_key = bytes(chunk_naming) if chunk_naming is not None else legacy_chunk_naming(keys)

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
        """Read a key file written by `create`, `rotate` or `retire`."""
        path = Path(path)
        doc = _read(path)
        if doc.active not in doc.keys:
            raise KeyFileError(
                f"key file {path}: the active key {doc.active!r} is not among its keys "
                f"{sorted(doc.keys)}; restore the file from its backup"
            )
        return cls(doc.keys, doc.active, path, chunk_naming=_naming_key_of(doc))

    @classmethod
    def create(cls, path: Path | str) -> Keyring:
        """Write a new key file holding one fresh key and a fresh chunk-naming key; refuses to replace an
        existing file."""
        path = Path(path)
        key_id = _new_key_id(set())
        doc = _KeyFile(key_id, {key_id: os.urandom(KEY_BYTES)}, os.urandom(KEY_BYTES))
        _write(path, doc, replace=False)
        return cls(doc.keys, key_id, path, chunk_naming=doc.chunk_naming)

    @classmethod
    def rotate(cls, path: Path | str) -> str:
        """Add a fresh key to the key file and make it active; old keys stay so old objects still open.

        Read, change and write happen under the key file's lock, so rotations at once each add their key.
        """
        path = Path(path)
        with locked(path):
            doc = _read(path)
            # Settled before the new key joins: a legacy file's derivation depends on which keys it holds.
            naming = _naming_key_of(doc)
            key_id = _new_key_id(set(doc.keys))
            doc.keys[key_id] = os.urandom(KEY_BYTES)
            _write(path, _KeyFile(key_id, doc.keys, naming), replace=True)
        return key_id

    @classmethod
    def retire(cls, path: Path | str, key_id: str) -> None:
        """Remove a key that nothing uses any more from the key file (under its lock).

        Refuses the active key and a key the file does not hold. Whether any object or tenant key still
        needs `key_id` is the caller's to check first (`key_usage`): this only edits the file.
        """
        path = Path(path)
        with locked(path):
            doc = _read(path)
            check_retirable(path, doc.keys, doc.active, key_id)
            # The chunk-naming key is settled before the key goes: for a file without the field it is
            # derived from the oldest key, which may be the one being removed.
            naming = _naming_key_of(doc)
            del doc.keys[key_id]
            _write(path, _KeyFile(doc.active, doc.keys, naming), replace=True)


def check_retirable(path: Path, key_ids: Iterable[str], active_id: str, key_id: str) -> None:
    """Refuse, with the reason, to retire a key the file does not hold or the active one."""
    held = sorted(key_ids)
    if key_id not in held:
        raise KeyFileError(
            f"key file {path} holds no key {key_id!r} (it holds {', '.join(held)}); "
            "`deskvault keys list` shows them"
        )
    if key_id == active_id:
        raise KeyFileError(
            f"key {key_id!r} is the active key of {path}: new objects are wrapped by it. "
            "Rotate first (`deskvault keys rotate`), and retire it once nothing uses it"
        )


def legacy_chunk_naming(keys: Mapping[str, bytes]) -> bytes:
    """The chunk-naming key of key files without a `chunk_naming` field: derived from the oldest key."""
    return hmac.new(bytes(keys[min(keys)]), _LEGACY_NAMING_LABEL, hashlib.sha256).digest()


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on `<key file>.lock` (mode 0600, beside it): for read-modify-write.

    A lock file of its own, since the key file itself is replaced by every write (a lock on it would be
    on the old inode); flock, since it goes with the process, also when it is killed.
    """
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise KeyFileError(f"the lock file {lock_path} of key file {path} cannot be opened: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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


class _KeyFile:
    """What a key file holds: the active key's id, every key, and the chunk-naming key (None in files
    written before it had a field of its own)."""

    def __init__(self, active: str, keys: dict[str, bytes], chunk_naming: bytes | None) -> None:
        self.active = active
        self.keys = keys
        self.chunk_naming = chunk_naming

    def __repr__(self) -> str:
        return f"_KeyFile(active={self.active!r}, key_ids={sorted(self.keys)!r})"


def _naming_key_of(doc: _KeyFile) -> bytes:
    """The file's chunk-naming key; for a file without the field, the one derived from its oldest key.

    Chunk names used to be derived from the oldest key-encryption key, so retiring that key renamed every
    chunk and no snapshot restored. Files without the field keep that derivation, so their existing
    chunk names stay valid, and every write (rotate, retire) stores it in the file: from then on it no
    longer depends on which keys the file holds.
    """
    return doc.chunk_naming if doc.chunk_naming is not None else legacy_chunk_naming(doc.keys)


def _read(path: Path) -> _KeyFile:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist; run `deskvault init` (or `deskvault keys create`), or point "
            "[repository] key_file at the right file"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} could not be read: {exc}") from None
    try:
        # Checked on the open file, so what is read is what was checked.
        mode = os.fstat(fd).st_mode
        if mode & _SHARED_MODE_BITS:
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(mode):04o}, so its group or others may read or "
                f"change the keys; refusing to use it: run `chmod 600 {path}` (and consider who may have "
                "copied it)"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} could not be read: {exc}") from None
    finally:
        os.close(fd)
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
    chunk_naming = None
    if "chunk_naming" in doc:
        encoded = doc["chunk_naming"]
        try:
            chunk_naming = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except binascii.Error:
            chunk_naming = b""
        if len(chunk_naming) != KEY_BYTES:
            raise KeyFileError(
                f"key file {path}: chunk_naming must be the base64 of {KEY_BYTES} bytes; "
                "restore the file from its backup"
            )
    return _KeyFile(doc["active"], keys, chunk_naming)


def _write(path: Path, key_file: _KeyFile, *, replace: bool) -> None:
    doc: dict[str, object] = {
        "active": key_file.active,
        "keys": {k: base64.b64encode(v).decode("ascii") for k, v in key_file.keys.items()},
    }
    if key_file.chunk_naming is not None:
        doc["chunk_naming"] = base64.b64encode(key_file.chunk_naming).decode("ascii")
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
