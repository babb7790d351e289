"""Errors of the encrypted object repository; each message says what failed and what to do next."""

from __future__ import annotations

from deskvault_core.errors import DeskvaultError


class RepositoryError(DeskvaultError):
    """The backup repository failed."""


class KeyFileError(RepositoryError):
    """The key file is missing, unreadable or malformed; the message names the file."""

    exit_code = 2


class ObjectNotFound(RepositoryError):
    """The object is not in the bucket."""


class AlreadyExists(RepositoryError):
    """A conditional write lost: the object already exists."""


class IntegrityError(RepositoryError):
    """Stored data failed authentication, a checksum or a length check; the message names the object."""

    def __init__(self, detail: str, key: str | None = None) -> None:
        where = f"object {key!r}" if key else "encrypted data"
        super().__init__(
            f"{where} failed its integrity check: {detail}. Treat it as damaged or tampered with: "
            "do not restore from it, use another backup and check who can write to the bucket"
        )
        self.detail = detail
        self.key = key

    def for_key(self, key: str) -> IntegrityError:
        """The same failure, naming the object key the caller was reading."""
        return IntegrityError(self.detail, key)

    def __reduce__(self) -> tuple[type[IntegrityError], tuple[str, str | None]]:
        # Exception pickling replays `args` (the full text), which would not fit this constructor.
        return (type(self), (self.detail, self.key))


class KeyNotFound(RepositoryError):
    """The key that encrypted an object is not in the loaded keyring."""

    def __init__(self, key_id: str, source: str | None = None) -> None:
        loaded = f" loaded from {source}" if source else ""
        super().__init__(
            f"key {key_id!r} is not in the keyring{loaded}; load the old key file that holds it "
            "(rotation keeps old keys, so an older copy of the key file has it) and try again"
        )
        self.key_id = key_id
        self.source = source

    def __reduce__(self) -> tuple[type[KeyNotFound], tuple[str, str | None]]:
        return (type(self), (self.key_id, self.source))
