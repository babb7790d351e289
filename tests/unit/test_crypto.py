"""The streamed encryption format: round trips at frame edges, and every kind of damage detected."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.repository.crypto import (
    DEFAULT_FRAME_SIZE,
    MAX_FRAME_SIZE,
    decrypt_stream,
    encrypt_stream,
    header_key_id,
)
from workers.repository.errors import IntegrityError, KeyNotFound, RepositoryError
from workers.repository.keyring import Keyring

FRAME = 64


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring.create(tmp_path_factory.mktemp("keys") / "keys.json")


def seal(keyring: Keyring, data: bytes, frame_size: int = FRAME) -> bytes:
    return b"".join(encrypt_stream(keyring, [data], frame_size))


def open_(keyring: Keyring, sealed: bytes, piece: int | None = None) -> bytes:
    step = piece or max(len(sealed), 1)
    return b"".join(decrypt_stream(keyring, [sealed[i : i + step] for i in range(0, len(sealed), step)]))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def frames(keyring: Keyring, sealed: bytes) -> tuple[bytes, list[bytes]]:
    """The header and the frames (length prefix included) of a sealed object."""
    id_length = sealed[5]
    wrapped_at = 6 + id_length
    (wrapped_length,) = struct.unpack(">H", sealed[wrapped_at : wrapped_at + 2])
    pos = wrapped_at + 2 + wrapped_length
    header, out = sealed[:pos], []
    while pos < len(sealed):
        (length,) = struct.unpack(">I", sealed[pos : pos + 4])
        out.append(sealed[pos : pos + 4 + length])
        pos += 4 + length
    return header, out


@pytest.mark.parametrize("size", [0, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME, 3 * FRAME + 5])
def test_round_trip_at_frame_edges(keyring: Keyring, size: int) -> None:
    data = os.urandom(size)

    sealed = seal(keyring, data)

    assert open_(keyring, sealed) == data
    assert open_(keyring, sealed, piece=1) == data
    expected_frames = max(1, -(-size // FRAME))
    assert len(frames(keyring, sealed)[1]) == expected_frames


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=3000),
    frame_size=st.integers(min_value=1, max_value=400),
    input_cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
    output_cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    as_bytearray=st.booleans(),
)
def test_round_trip_with_any_splits(
    keyring: Keyring,
    data: bytes,
    frame_size: int,
    input_cuts: list[int],
    output_cuts: list[int],
    as_bytearray: bool,
) -> None:
    pieces = split(data, input_cuts)
    source = [bytearray(p) for p in pieces] if as_bytearray else pieces

    sealed = b"".join(encrypt_stream(keyring, source, frame_size))

    assert b"".join(decrypt_stream(keyring, split(sealed, output_cuts))) == data


def test_accepts_memoryviews_and_empty_chunks(keyring: Keyring) -> None:
    data = os.urandom(300)
    source = [b"", memoryview(data)[:100], b"", memoryview(bytearray(data[100:])), b""]

    assert open_(keyring, b"".join(encrypt_stream(keyring, source, FRAME))) == data


def test_each_object_gets_its_own_data_key(keyring: Keyring) -> None:
    data = b"same plaintext" * 10

    first, second = seal(keyring, data), seal(keyring, data)

    assert first != second
    assert frames(keyring, first)[1][0] != frames(keyring, second)[1][0]


def test_header_names_the_key(keyring: Keyring) -> None:
    sealed = seal(keyring, b"x")

    assert header_key_id(sealed[: 6 + len(keyring.active_id)]) == keyring.active_id
    assert header_key_id(sealed) == keyring.active_id
    with pytest.raises(IntegrityError, match="truncated"):
        header_key_id(sealed[:10])
    with pytest.raises(IntegrityError, match="not a deskvault object"):
        header_key_id(b"PK\x03\x04" + sealed[4:])


def test_encryption_streams_instead_of_reading_everything(keyring: Keyring) -> None:
    endless = itertools.repeat(b"y" * 10)

    first = list(itertools.islice(encrypt_stream(keyring, endless, FRAME), 5))

    assert len(first) == 5


def test_decryption_yields_before_the_end(keyring: Keyring) -> None:
    sealed = seal(keyring, os.urandom(10 * FRAME))
    header, body = frames(keyring, sealed)

    def source() -> Iterator[bytes]:
        yield header
        yield body[0]
        yield body[1]
        raise AssertionError("read past the second frame before yielding the first")

    assert len(next(iter(decrypt_stream(keyring, source())))) == FRAME


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_tampering_any_byte_is_detected(keyring: Keyring, position: int, flip: int) -> None:
    sealed = bytearray(seal(keyring, os.urandom(2 * FRAME + 10)))
    position %= len(sealed)
    sealed[position] ^= flip
    key_id_span = range(5, 6 + len(keyring.active_id))

    # A changed key id names a key that is not loaded; that is reported as such.
    allowed = (IntegrityError, KeyNotFound) if position in key_id_span else IntegrityError
    with pytest.raises(allowed):
        open_(keyring, bytes(sealed))


def test_every_byte_of_a_small_object_is_covered(keyring: Keyring) -> None:
    sealed = seal(keyring, os.urandom(FRAME + 3))
    key_id_span = range(5, 6 + len(keyring.active_id))
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x80
        with pytest.raises((IntegrityError, KeyNotFound) if position in key_id_span else IntegrityError):
            open_(keyring, bytes(tampered))


def test_every_truncation_is_detected(keyring: Keyring) -> None:
    sealed = seal(keyring, os.urandom(2 * FRAME + 7))
    for end in range(len(sealed)):
        with pytest.raises(IntegrityError, match="truncated"):
            open_(keyring, sealed[:end], piece=7)


def test_dropping_the_last_frame_is_detected(keyring: Keyring) -> None:
    header, body = frames(keyring, seal(keyring, os.urandom(3 * FRAME)))

    with pytest.raises(IntegrityError, match="not the final frame"):
        open_(keyring, header + b"".join(body[:-1]))


def test_swapping_frames_is_detected(keyring: Keyring) -> None:
    header, body = frames(keyring, seal(keyring, os.urandom(3 * FRAME)))

    with pytest.raises(IntegrityError, match="frame 0 failed authentication"):
        open_(keyring, header + body[1] + body[0] + body[2])


def test_data_after_the_final_frame_is_detected(keyring: Keyring) -> None:
    sealed = seal(keyring, os.urandom(2 * FRAME))

    with pytest.raises(IntegrityError, match="follows the final frame"):
        open_(keyring, sealed + b"\x00\x00\x00\x20" + os.urandom(32))
    with pytest.raises(IntegrityError):
        open_(keyring, sealed + b"junk")


def test_frames_from_another_object_are_rejected(keyring: Keyring) -> None:
    header_a, body_a = frames(keyring, seal(keyring, os.urandom(2 * FRAME)))
    _header_b, body_b = frames(keyring, seal(keyring, os.urandom(2 * FRAME)))

    with pytest.raises(IntegrityError, match="frame 1 failed authentication"):
        open_(keyring, header_a + body_a[0] + body_b[1])


def test_header_from_another_object_is_rejected(keyring: Keyring) -> None:
    header_a, _ = frames(keyring, seal(keyring, b"a" * FRAME))
    _, body_b = frames(keyring, seal(keyring, b"a" * FRAME))

    with pytest.raises(IntegrityError, match="failed authentication"):
        open_(keyring, header_a + b"".join(body_b))


@pytest.mark.parametrize("length", [0, 15, MAX_FRAME_SIZE + 17, 2**32 - 1])
def test_frame_lengths_out_of_range_are_rejected(keyring: Keyring, length: int) -> None:
    header, body = frames(keyring, seal(keyring, b"z" * 10))

    with pytest.raises(IntegrityError, match=f"claims {length} bytes"):
        open_(keyring, header + struct.pack(">I", length) + body[0][4:])


def test_frame_limit_is_configurable(keyring: Keyring) -> None:
    sealed = seal(keyring, os.urandom(200), frame_size=200)

    with pytest.raises(IntegrityError, match=r"outside 16\.\.116"):
        b"".join(decrypt_stream(keyring, [sealed], max_frame_size=100))


def test_wrong_magic_or_version_is_named(keyring: Keyring) -> None:
    sealed = seal(keyring, b"x")

    with pytest.raises(IntegrityError, match="not a deskvault object"):
        open_(keyring, b"XXXX" + sealed[4:])
    with pytest.raises(IntegrityError, match="format version 2"):
        open_(keyring, sealed[:4] + b"\x02" + sealed[5:])


def test_old_objects_open_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    old = Keyring.create(path)
    data = os.urandom(5 * FRAME)
    sealed = seal(old, data)

    new_id = Keyring.rotate(path)
    rotated = Keyring.load(path)

    assert header_key_id(sealed) == old.active_id != new_id
    assert open_(rotated, sealed) == data
    assert header_key_id(seal(rotated, data)) == new_id


def test_unknown_key_is_named(tmp_path: Path) -> None:
    # Ids are creation times, so a key file made in the same second would share the id.
    other = Keyring({"k20200101T000000Z": os.urandom(32)}, "k20200101T000000Z")
    mine = Keyring.create(tmp_path / "mine.json")
    sealed = seal(other, b"secret")

    with pytest.raises(KeyNotFound, match="old key file") as info:
        open_(mine, sealed)

    assert other.active_id in str(info.value)
    assert isinstance(info.value, RepositoryError)


@pytest.mark.parametrize("frame_size", [0, -1, MAX_FRAME_SIZE + 1])
def test_frame_size_is_checked(keyring: Keyring, frame_size: int) -> None:
    with pytest.raises(ValueError, match="frame_size"):
        next(encrypt_stream(keyring, [b"x"], frame_size))


def test_default_frame_size_is_four_mebibytes() -> None:
    assert DEFAULT_FRAME_SIZE == 4 * 2**20


def test_the_context_is_authenticated(keyring: Keyring) -> None:
    sealed = b"".join(
        encrypt_stream(keyring, [b"manifest of backup A"], FRAME, context=b"backups/a/manifest")
    )

    assert (
        b"".join(decrypt_stream(keyring, [sealed], context=b"backups/a/manifest")) == b"manifest of backup A"
    )
    with pytest.raises(IntegrityError):
        b"".join(decrypt_stream(keyring, [sealed], context=b"backups/b/manifest"))
