"""The streamed authenticated encryption format of stored objects (AES-256-GCM in numbered frames).

Header: b"DVLT", version 1, key-id length (1 byte) + key id, wrapped-key length (2 bytes, big-endian)
+ wrapped data key. Then frames: ciphertext length (4 bytes, big-endian) + ciphertext and tag of up to
`frame_size` plaintext bytes. Frame i's nonce is i as 11 big-endian bytes + a final flag byte (1 on the
last frame only); every frame's AAD is the SHA-256 of the header and the caller's context (the
object key), tying the frames to this object at this key.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from workers.repository.errors import IntegrityError
from workers.repository.keyring import Keyring, valid_key_id

MAGIC = b"DVLT"
VERSION = 1
TAG_BYTES = 16
DATA_KEY_BYTES = 32
DEFAULT_FRAME_SIZE = 4 * 2**20
# The decryptor's bound on a frame: the header doesn't record the frame size, and a corrupt length
# must not make us buffer gigabytes.
MAX_FRAME_SIZE = 64 * 2**20
_PREFIX = struct.Struct(">4sBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def encrypt_stream(
    keyring: Keyring, chunks: Iterable[bytes], frame_size: int = DEFAULT_FRAME_SIZE, *, context: bytes = b""
) -> Iterator[bytes]:
    """Encrypt `chunks` (any sizes) under a fresh data key; memory stays near two frames.

    `context` (the object's key in the repository) is authenticated too, so an object moved or swapped
    to another key fails to decrypt there.
    """
    if not 0 < frame_size <= MAX_FRAME_SIZE:
        raise ValueError(f"frame_size must be between 1 and {MAX_FRAME_SIZE} bytes, not {frame_size}")
    data_key = os.urandom(DATA_KEY_BYTES)
    key_id, wrapped = keyring.wrap(data_key)
    header = _header(key_id, wrapped)
    aad = hashlib.sha256(header + context).digest()
    cipher = AESGCM(data_key)
    yield header

    pending = bytearray(frame_size)
    view = memoryview(pending)
    filled = 0
    # A complete frame is held back until it is known whether more data follows (it's the last if not).
    held: memoryview | None = None
    index = 0
    for chunk in chunks:
        data = memoryview(chunk).cast("B")
        # Whole frames are sealed straight from immutable input; anything else is copied once.
        direct = isinstance(chunk, bytes)
        pos, size = 0, len(data)
        while pos < size:
            if held is not None:
                yield from _seal(cipher, index, False, held, aad)
                index += 1
                held = None
            if direct and filled == 0 and size - pos >= frame_size:
                held = data[pos : pos + frame_size]
                pos += frame_size
                continue
            take = min(frame_size - filled, size - pos)
            view[filled : filled + take] = data[pos : pos + take]
            filled += take
            pos += take
            if filled == frame_size:
                held, filled = view, 0
    yield from _seal(cipher, index, True, held if held is not None else view[:filled], aad)


def decrypt_stream(
    keyring: Keyring, data: Iterable[bytes], *, max_frame_size: int = MAX_FRAME_SIZE, context: bytes = b""
) -> Iterator[bytes]:
    """Decrypt what `encrypt_stream` produced, from chunks split anywhere; IntegrityError on any damage."""
    reader = _Reader(data)
    header = _read_header(reader)
    key_id, wrapped = _parse_header(header)
    cipher = AESGCM(keyring.unwrap(key_id, wrapped))
    # The header is self-delimiting, so header + context is an unambiguous encoding of both.
    aad = hashlib.sha256(header + context).digest()

    length_buf = bytearray(_U32.size)
    frame = bytearray(0)
    index = 0
    while True:
        got = reader.readinto(memoryview(length_buf))
        if got == 0:
            # Only reachable before frame 0: after a frame, the end of the stream is seen by at_end().
            raise IntegrityError("the stream ended after the header, before any frame (truncated)")
        if got < _U32.size:
            raise IntegrityError(f"the stream ended inside the length of frame {index} (truncated)")
        (length,) = _U32.unpack(length_buf)
        if not TAG_BYTES <= length <= max_frame_size + TAG_BYTES:
            raise IntegrityError(f"frame {index} claims {length} bytes, outside 16..{max_frame_size + 16}")
        body = reader.take(length)
        if body is None:
            if len(frame) < length:
                frame = bytearray(length)
            body = memoryview(frame)[:length]
            if reader.readinto(body) < length:
                raise IntegrityError(f"the stream ended inside frame {index} (truncated)")
        # Where the stream ends tells which flag the frame must carry; the other flag is tried only
        # on failure, to name the damage.
        last = reader.at_end()
        try:
            plain = cipher.decrypt(_nonce(index, last), body, aad)
        except InvalidTag:
            raise IntegrityError(_diagnose(cipher, index, last, body, aad)) from None
        finally:
            body.release()
        if plain:
            yield plain
        if last:
            return
        index += 1


def header_key_id(first_bytes: bytes) -> str:
    """The id of the key that wrapped an object's data key, read from the object's first bytes."""
    reader = _Reader([first_bytes])
    prefix = _check_prefix(reader.read_exact(_PREFIX.size, "the header"))
    key_id = reader.read_exact(prefix[2], "the header's key id").decode("ascii", errors="replace")
    if not valid_key_id(key_id):
        raise IntegrityError(f"the header's key id {key_id!r} is malformed")
    return key_id


def _header(key_id: str, wrapped: bytes) -> bytes:
    encoded = key_id.encode("ascii")
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(encoded)), encoded, _U16.pack(len(wrapped)), wrapped))


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _seal(cipher: AESGCM, index: int, final: bool, plain: memoryview, aad: bytes) -> Iterator[bytes]:
    sealed = cipher.encrypt(_nonce(index, final), plain, aad)
    yield _U32.pack(len(sealed))
    yield sealed


def _read_header(reader: _Reader) -> bytes:
    prefix = reader.read_exact(_PREFIX.size, "the header")
    key_id = reader.read_exact(_check_prefix(prefix)[2], "the header's key id")
    wrapped_length = reader.read_exact(_U16.size, "the header")
    wrapped = reader.read_exact(_U16.unpack(wrapped_length)[0], "the header's wrapped key")
    return prefix + key_id + wrapped_length + wrapped


def _check_prefix(prefix: bytes) -> tuple[bytes, int, int]:
    magic, version, id_length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise IntegrityError("the header does not start with DVLT: this is not a deskvault object")
    if version != VERSION:
        raise IntegrityError(f"the header has format version {version}, this deskvault reads {VERSION}")
    return magic, version, id_length


def _parse_header(header: bytes) -> tuple[str, bytes]:
    id_length = header[_PREFIX.size - 1]
    raw_id = header[_PREFIX.size : _PREFIX.size + id_length]
    key_id = raw_id.decode("ascii", errors="replace")
    if not valid_key_id(key_id):
        raise IntegrityError(f"the header's key id {key_id!r} is malformed")
    return key_id, header[_PREFIX.size + id_length + _U16.size :]


def _diagnose(cipher: AESGCM, index: int, last: bool, body: memoryview, aad: bytes) -> str:
    try:
        cipher.decrypt(_nonce(index, not last), body, aad)
    except InvalidTag:
        return f"frame {index} failed authentication (tampered, reordered or taken from another object)"
    if last:
        return f"the stream ended after frame {index}, which is not the final frame (truncated)"
    return f"data follows the final frame {index} (appended or spliced)"


class _Reader:
    """Exact-size reads from an iterable of byte chunks, copying each byte once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._current = memoryview(b"")
        self._offset = 0

    def _advance(self) -> bool:
        while self._offset >= len(self._current):
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._current = memoryview(chunk).cast("B")
            self._offset = 0
        return True

    def take(self, size: int) -> memoryview | None:
        """The next `size` bytes without copying, if one immutable chunk holds them all; else None."""
        if not self._advance() or not isinstance(self._current.obj, bytes):
            return None
        if len(self._current) - self._offset < size:
            return None
        self._offset += size
        return self._current[self._offset - size : self._offset]

    def readinto(self, out: memoryview) -> int:
        """Fill `out`; fewer bytes only when the stream ends."""
        filled, wanted = 0, len(out)
        while filled < wanted and self._advance():
            take = min(wanted - filled, len(self._current) - self._offset)
            out[filled : filled + take] = self._current[self._offset : self._offset + take]
            filled += take
            self._offset += take
        return filled

    def read_exact(self, size: int, what: str) -> bytes:
        """Exactly `size` bytes, or IntegrityError naming `what` was cut short."""
        out = bytearray(size)
        if self.readinto(memoryview(out)) < size:
            raise IntegrityError(f"the stream ended inside {what} (truncated)")
        return bytes(out)

    def at_end(self) -> bool:
        """Whether no bytes are left."""
        return not self._advance()
