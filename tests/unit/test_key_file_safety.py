"""The key file against its everyday hazards: a key removed that chunk names depended on, a file others
can read, and two rotations at once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.repository.errors import KeyFileError
from workers.repository.key_usage import KeyCount, KeyUsage, ScanProgress, Unreadable, retire_refusal
from workers.repository.keyring import Keyring

CHUNKS = (b"", b"a chunk of an attachment", os.urandom(4096))
ROOT = Path(__file__).resolve().parents[2]


def _names(keyring: Keyring) -> list[str]:
    return [keyring.content_id(chunk) for chunk in CHUNKS]


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


def _rewrite(path: Path, doc: dict) -> None:
    """Edit a key file in place, as an operator would (its mode stays 0600)."""
    path.write_text(json.dumps(doc))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _legacy_file(path: Path) -> tuple[bytes, bytes]:
    """A key file as written before chunk names had a key of their own: k1 the oldest, k2 active."""
    k1, k2 = os.urandom(32), os.urandom(32)
    doc = {
        "active": "k20240101T000000Z",
        "keys": {
            "k20230101T000000Z": base64.b64encode(k1).decode(),
            "k20240101T000000Z": base64.b64encode(k2).decode(),
        },
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return k1, k2


# -- chunk names --------------------------------------------------------------------------------------


def test_chunk_names_survive_removing_the_oldest_key_from_the_file(tmp_path: Path) -> None:
    # Given a key file that was rotated once, and the chunk names it gives
    path = tmp_path / "keys.json"
    Keyring.create(path)
    Keyring.rotate(path)
    before = _names(Keyring.load(path))

    # When the oldest key, which no object uses any more, is taken out of the file
    doc = _doc(path)
    del doc["keys"][min(doc["keys"])]
    _rewrite(path, doc)

    # Then every chunk keeps its name, so snapshots still restore and deduplicate
    assert _names(Keyring.load(path)) == before


def test_chunk_names_survive_rotating_and_retiring_the_oldest_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = Keyring.create(path)
    before = _names(created)
    oldest = created.active_id

    Keyring.rotate(path)
    assert _names(Keyring.load(path)) == before
    Keyring.retire(path, oldest)

    keyring = Keyring.load(path)
    assert oldest not in keyring.key_ids
    assert _names(keyring) == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_new_key_file_has_a_chunk_naming_key_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keyring = Keyring.create(path)

    doc = _doc(path)
    naming = base64.b64decode(doc["chunk_naming"])
    assert len(naming) == 32
    assert keyring.content_id(b"x") == hmac.new(naming, b"x", hashlib.sha256).hexdigest()
    # Not derived from the key-encryption key
    kek = base64.b64decode(doc["keys"][keyring.active_id])
    assert naming != hmac.new(kek, b"deskvault-chunk-names-v1", hashlib.sha256).digest()
    assert Keyring.create(tmp_path / "other.json").content_id(b"x") != keyring.content_id(b"x")


def test_a_legacy_key_file_keeps_its_chunk_names_and_gains_the_field_on_the_next_write(
    tmp_path: Path,
) -> None:
    # Given a key file without the chunk_naming field
    path = tmp_path / "keys.json"
    k1, _k2 = _legacy_file(path)
    legacy = Keyring.load(path)
    before = _names(legacy)
    # Its chunk names are derived from the oldest key exactly as they always were
    derived = hmac.new(k1, b"deskvault-chunk-names-v1", hashlib.sha256).digest()
    assert before == [hmac.new(derived, c, hashlib.sha256).hexdigest() for c in CHUNKS]
    assert "chunk_naming" not in _doc(path)  # loading alone writes nothing

    # When it is rotated, then it gains the field, holding that same key, and names stay
    Keyring.rotate(path)
    assert base64.b64decode(_doc(path)["chunk_naming"]) == derived
    assert _names(Keyring.load(path)) == before

    # And retiring the oldest key, the one the names came from, changes none of them
    Keyring.retire(path, "k20230101T000000Z")
    assert "k20230101T000000Z" not in _doc(path)["keys"]
    assert _names(Keyring.load(path)) == before


def test_retiring_the_oldest_key_of_a_legacy_file_stores_its_chunk_naming_key_first(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _legacy_file(path)
    before = _names(Keyring.load(path))

    Keyring.retire(path, "k20230101T000000Z")

    assert _names(Keyring.load(path)) == before


def test_a_legacy_file_whose_new_key_sorts_first_keeps_its_names(tmp_path: Path) -> None:
    # Hand-named keys: the rotated key's id sorts before the old ones, so it would be the "oldest"
    path = tmp_path / "keys.json"
    key = os.urandom(32)
    path.write_text(json.dumps({"active": "zz-prod", "keys": {"zz-prod": base64.b64encode(key).decode()}}))
    path.chmod(0o600)
    before = _names(Keyring.load(path))

    Keyring.rotate(path)

    assert min(_doc(path)["keys"]) != "zz-prod"
    assert _names(Keyring.load(path)) == before


def test_a_malformed_chunk_naming_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    doc = _doc(path)
    doc["chunk_naming"] = base64.b64encode(b"short").decode()
    _rewrite(path, doc)

    with pytest.raises(KeyFileError, match="chunk_naming must be the base64 of 32 bytes"):
        Keyring.load(path)


# -- retire -------------------------------------------------------------------------------------------


def test_retire_refuses_the_active_key_and_an_unknown_one_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    active = Keyring.rotate(path)
    before = path.read_bytes()

    with pytest.raises(KeyFileError, match=rf"'{active}' is the active key.*keys rotate"):
        Keyring.retire(path, active)
    with pytest.raises(KeyFileError, match=r"holds no key 'k19990101T000000Z'"):
        Keyring.retire(path, "k19990101T000000Z")

    assert path.read_bytes() == before


def test_retire_refusal_names_objects_tenant_keys_and_unreadable_headers() -> None:
    usage = KeyUsage(
        objects=4,
        by_key={
            "k1": KeyCount(objects=3, stored_bytes=30, areas={"servers": 1, "targets": 2}),
            "k2": KeyCount(objects=1, stored_bytes=10, areas={"targets": 1}),
        },
    )
    assert retire_refusal(usage, "k3", 0) is None

    refusal = retire_refusal(usage, "k1", 0)
    assert refusal is not None and "3 object(s) (servers 1, targets 2)" in refusal
    assert "tenant key" not in refusal

    refusal = retire_refusal(usage, "k3", 2)
    assert refusal is not None and "2 legacy tenant key(s) in the control database" in refusal

    # Tenant keys in the key store are objects too, and retention never expires them: said so
    usage.by_key["k4"] = KeyCount(objects=1, stored_bytes=100, areas={"keystore": 1})
    refusal = retire_refusal(usage, "k4", 0)
    assert refusal is not None and "keystore 1" in refusal and "until they are purged" in refusal

    usage.unreadable.append(Unreadable("servers/x/stray.txt", "not a deskvault object"))
    refusal = retire_refusal(usage, "k3", 0)
    assert refusal is not None and "servers/x/stray.txt: not a deskvault object" in refusal


def test_scan_progress_speaks_only_for_long_scans() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = ScanProgress(lines.append, clock=lambda: now[0])
    progress(1000, 3000)
    now[0] = 0.5
    progress(3000, 3000)
    assert lines == []  # quick: nothing said

    progress = ScanProgress(lines.append, clock=lambda: now[0])
    now[0] = 2.0
    progress(1000, 3000)
    progress(2000, 3000)  # within the interval
    now[0] = 2.5
    progress(3000, 3000)
    assert lines == ["key usage: 1000 of 3000 objects (33%)", "key usage: 3000 of 3000 objects (100%)"]


# -- the file's mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o602, 0o620, 0o610, 0o601], ids=oct)
def test_a_key_file_others_may_read_or_change_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    path.chmod(mode)
    before = path.read_bytes()

    for use in (Keyring.load, Keyring.rotate):
        with pytest.raises(KeyFileError) as info:
            use(path)
        message = str(info.value)
        assert str(path) in message
        assert f"mode {mode:04o}" in message
        assert f"run `chmod 600 {path}`" in message
        assert base64.b64encode(before).decode()[:12] not in message

    assert path.read_bytes() == before  # rotate changed nothing


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=oct)
def test_a_private_key_file_loads(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.json"
    created = Keyring.create(path)
    path.chmod(mode)

    assert Keyring.load(path).active_id == created.active_id


def test_the_lock_file_beside_the_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    Keyring.create(path)
    Keyring.rotate(path)

    lock = tmp_path / "keys.json.lock"
    assert lock.exists() and stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert lock.read_bytes() == b""  # it holds nothing


# -- rotations at once --------------------------------------------------------------------------------

_ROTATOR = """
import sys, time
from pathlib import Path
from workers.repository.keyring import Keyring
path, go, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
for _ in range(n):
    print(Keyring.rotate(path), flush=True)
"""


def test_rotations_at_once_lose_no_key(tmp_path: Path) -> None:
    # Given a key file and several processes ready to rotate it many times, all at the same moment
    path = tmp_path / "keys.json"
    first = Keyring.create(path)
    before = _names(first)
    go = tmp_path / "go"
    processes, rounds = 4, 15
    rotators = [
        subprocess.Popen(
            [sys.executable, "-c", _ROTATOR, str(path), str(go), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(processes)
    ]
    time.sleep(1.0)  # every interpreter started and waiting
    go.touch()
    outputs = [p.communicate(timeout=120) for p in rotators]
    assert all(p.returncode == 0 for p in rotators), [err for _, err in outputs]

    # Then every key each rotation made is in the file, and one of them is active
    made = [line for out, _ in outputs for line in out.split()]
    assert len(made) == len(set(made)) == processes * rounds
    keyring = Keyring.load(path)
    assert set(keyring.key_ids) == {first.active_id, *made}
    assert keyring.active_id in made
    assert _names(keyring) == before
