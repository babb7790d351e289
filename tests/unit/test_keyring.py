"""The key file: creation, loading, rotation, key wrapping, and keeping key material out of sight."""

from __future__ import annotations

import base64
import json
import pickle
import re
import stat
from pathlib import Path

import pytest

from workers.repository.errors import IntegrityError, KeyFileError, KeyNotFound
from workers.repository.keyring import Keyring

KEY_ID = re.compile(r"^k\d{8}T\d{6}Z(-\d+)?$")


def _file_keys(path: Path) -> dict[str, str]:
    return json.loads(path.read_text())["keys"]


def _write_private(path: Path, text: str) -> None:
    """A hand-written key file, private as the loader insists (a group- or world-readable one is refused)."""
    path.write_text(text)
    path.chmod(0o600)


def test_create_writes_a_private_file_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"

    keyring = Keyring.create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KEY_ID.match(keyring.active_id)
    doc = json.loads(path.read_text())
    assert doc["active"] == keyring.active_id
    assert len(base64.b64decode(doc["keys"][keyring.active_id])) == 32
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    before = path.read_bytes()

    with pytest.raises(KeyFileError, match="already exists"):
        Keyring.create(path)

    assert path.read_bytes() == before


def test_load_round_trips_and_unwraps_what_create_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = Keyring.create(path)
    key_id, wrapped = created.wrap(b"d" * 32)

    loaded = Keyring.load(path)

    assert loaded.active_id == created.active_id == key_id
    assert loaded.unwrap(key_id, wrapped) == b"d" * 32
    assert len(wrapped) == 12 + 32 + 16


def test_rotate_adds_an_active_key_and_keeps_the_old_ones(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    old = Keyring.create(path)
    old_id, wrapped = old.wrap(b"o" * 32)

    first = Keyring.rotate(path)
    second = Keyring.rotate(path)  # same second: the id must still be new
    keyring = Keyring.load(path)

    assert len({old_id, first, second}) == 3
    assert all(KEY_ID.match(k) for k in (first, second))
    assert keyring.active_id == second
    assert set(keyring.key_ids) == {old_id, first, second}
    assert keyring.unwrap(old_id, wrapped) == b"o" * 32
    assert keyring.wrap(b"n" * 32)[0] == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_unwrap_with_an_unknown_key_id_names_it(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys.json")

    with pytest.raises(KeyNotFound, match=r"k19990101T000000Z.*old key file") as info:
        keyring.unwrap("k19990101T000000Z", b"x" * 60)

    assert info.value.key_id == "k19990101T000000Z"
    assert str(tmp_path / "keys.json") in str(info.value)


def test_tampered_wrapped_key_fails_authentication(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "keys.json")
    key_id, wrapped = keyring.wrap(b"k" * 32)
    tampered = bytearray(wrapped)
    tampered[20] ^= 1

    with pytest.raises(IntegrityError, match="failed authentication"):
        keyring.unwrap(key_id, bytes(tampered))


def test_wrapped_key_is_bound_to_its_key_id(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    Keyring.rotate(path)
    keyring = Keyring.load(path)
    old_id, new_id = keyring.key_ids
    key_id, wrapped = keyring.wrap(b"k" * 32)
    assert key_id == new_id

    # Relabelling a wrapped key with another loaded id must not decrypt under that id.
    with pytest.raises(IntegrityError):
        keyring.unwrap(old_id, wrapped)


def test_repr_shows_ids_but_no_key_material(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    Keyring.rotate(path)
    keyring = Keyring.load(path)

    text = repr(keyring)

    for key_id, encoded in _file_keys(path).items():
        assert key_id in text
        assert encoded not in text
        assert encoded[:8] not in text
        assert repr(base64.b64decode(encoded)) not in text


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"nope\.json does not exist"):
        Keyring.load(tmp_path / "nope.json")


def test_bad_json_is_named_without_showing_the_contents(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _write_private(path, '{"active": "k1", "keys": {"k1": "SECRETSECRET"')

    with pytest.raises(KeyFileError, match="not valid JSON") as info:
        Keyring.load(path)

    assert str(path) in str(info.value)
    assert "SECRETSECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"k1": base64.b64encode(b"x" * 16).decode()}, "'k1' must be the base64 of 32 bytes"),
        ({"k1": "not base64!"}, "'k1' must be the base64 of 32 bytes"),
        ({"k1": 42}, "'k1' must be the base64 of 32 bytes"),
        ({"k 1": base64.b64encode(b"x" * 32).decode()}, "key id 'k 1'"),
        ({"k" * 65: base64.b64encode(b"x" * 32).decode()}, "1-64 printable ASCII"),
    ],
)
def test_malformed_keys_are_named(tmp_path: Path, keys: dict[str, object], fragment: str) -> None:
    path = tmp_path / "keys.json"
    _write_private(path, json.dumps({"active": next(iter(keys)), "keys": keys}))

    with pytest.raises(KeyFileError, match=re.escape(fragment)) as info:
        Keyring.load(path)

    assert str(path) in str(info.value)


def test_active_id_must_be_among_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _write_private(path, json.dumps({"active": "k2", "keys": {"k1": base64.b64encode(b"x" * 32).decode()}}))

    with pytest.raises(KeyFileError, match=r"active key 'k2' is not among its keys \['k1'\]"):
        Keyring.load(path)


def test_wrong_shape_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _write_private(path, "[]")

    with pytest.raises(KeyFileError, match='"active"'):
        Keyring.load(path)


def test_errors_survive_pickling() -> None:
    for error in (IntegrityError("frame 3 failed", "db/x"), KeyNotFound("k1", "/tmp/keys.json")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
