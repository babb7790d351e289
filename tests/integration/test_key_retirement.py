"""Retiring key-encryption keys for real (SeaweedFS, the control database, the CLI in its own process):
file snapshots outlive their oldest key, `keys list` counts what each key wraps, and `keys retire`
removes only what nothing needs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import run_cli, worker_context

from workers.repository.keyring import Keyring
from workers.repository.objects import ObjectRepository
from workers.servers import filetrees, tree_restore

pytestmark = pytest.mark.integration

MIB = 2**20


def _write_key_file(path: Path, active: str, keys: dict[str, bytes], *, chunk_naming: bytes | None) -> None:
    """A key file written by hand (ids unique to the test: the session's control database is shared)."""
    doc: dict[str, object] = {
        "active": active,
        "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()},
    }
    if chunk_naming is not None:
        doc["chunk_naming"] = base64.b64encode(chunk_naming).decode()
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


def _tree(root: Path) -> None:
    rng = random.Random(7)
    for i in range(6):
        folder = root / "attachments" / f"{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file-{i}.bin").write_bytes(rng.randbytes(MIB + 1234 * i))
    (root / "config").mkdir()
    (root / "config" / "helpdesk.conf").write_text("listen = 0.0.0.0:443\n")
    (root / "config" / "empty").write_bytes(b"")
    (root / "config" / "current").symlink_to("helpdesk.conf")


def _describe(root: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir", path.lstat().st_mode & 0o7777)
        else:
            found[rel] = (
                "file",
                path.lstat().st_mode & 0o7777,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return found


def _chunks(repo: ObjectRepository, server: str) -> set[str]:
    return set(repo.store.list_keys(f"servers/{server}/chunks/"))


@pytest.mark.parametrize(
    ("key_file_kind", "removal"),
    [("created", "keys retire"), ("legacy", "keys retire"), ("created", "by hand")],
)
def test_oldest_key_removed_and_snapshots_still_restore(
    make_settings, key_file: Path, tmp_path: Path, key_file_kind: str, removal: str
) -> None:
    # Given a key file whose oldest key k1 wraps nothing and whose active key k2 wraps everything:
    # made by `keys create` + `keys rotate`, or an older file without a chunk_naming field
    if key_file_kind == "created":
        k1 = Keyring.load(key_file).active_id
        Keyring.rotate(key_file)
    else:
        k1, k2 = f"k1-{uuid.uuid4().hex[:8]}", f"k2-{uuid.uuid4().hex[:8]}"
        _write_key_file(key_file, k2, {k1: os.urandom(32), k2: os.urandom(32)}, chunk_naming=None)
    root = tmp_path / "srv"
    root.mkdir()
    _tree(root)
    server = f"keys-{uuid.uuid4().hex[:8]}"
    settings = make_settings(extra=f'[servers.{server}]\ndriver = "files"\npaths = ["{root}"]\n')
    repo = worker_context(settings).repository
    assert k1 in repo.keyring.key_ids and repo.keyring.active_id != k1
    # And a snapshot of a file tree
    first, _ = filetrees.take_snapshot(repo, server, (str(root),), snapshot_id="s1", extra={})
    expected = _describe(root)
    stored = _chunks(repo, server)
    assert first["new_chunks"] == len(stored) > 6

    # When k1 is removed from the key file
    if removal == "keys retire":
        retired = run_cli(settings, "keys", "retire", k1)
        assert retired.returncode == 0, retired.stdout + retired.stderr
        assert f"retired key {k1}" in retired.stdout
    else:
        doc = json.loads(key_file.read_text())
        del doc["keys"][k1]
        key_file.write_text(json.dumps(doc))
    assert k1 not in json.loads(key_file.read_text())["keys"]

    # Then a worker started with the file as it is now restores the snapshot byte for byte
    repo = worker_context(settings).repository
    into = tmp_path / "restored"
    tree_restore.restore_snapshot(repo, first, into)
    assert _describe(into / str(root).lstrip("/")) == expected

    # And a second snapshot of the same tree, every file read again, finds every chunk under its old
    # name and uploads none
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second, _ = filetrees.take_snapshot(repo, server, (str(root),), snapshot_id="s2", extra={})
    assert second["reused_files"] == 0
    assert second["new_chunks"] == 0 and second["new_bytes"] == 0
    assert _chunks(repo, server) == stored
    tree_restore.restore_snapshot(repo, second, tmp_path / "restored-2")
    assert _describe(tmp_path / "restored-2" / str(root).lstrip("/")) == _describe(root)


@pytest.fixture
def keyed_repository(make_settings, key_file: Path):
    """A repository with four keys: k-old wraps two target objects and a server object, k-tenant only
    a legacy tenant key in the control database, k-unused nothing, k-active (active) one target object;
    and a tenant's export under a tenant key of its own."""
    tag = uuid.uuid4().hex[:8]
    ids = {name: f"{name}-{tag}" for name in ("k-old", "k-tenant", "k-unused", "k-active")}
    keys = {key_id: os.urandom(32) for key_id in ids.values()}
    naming = os.urandom(32)
    _write_key_file(key_file, ids["k-active"], keys, chunk_naming=naming)
    settings = make_settings()
    ctx = worker_context(settings)

    def as_active(name: str) -> ObjectRepository:
        return ObjectRepository(ctx.repository.store, Keyring(keys, ids[name], chunk_naming=naming))

    old = as_active("k-old")
    old.put_json("targets/main/backups/a/manifest.json.dv", {"n": 1})
    old.put_stream("targets/main/backups/a/base.tar.zst.dv", [b"x" * 1000])
    old.put_json("servers/web/snapshots/s1.json.dv", {"n": 2})
    ctx.repository.put_json("targets/main/backups/b/manifest.json.dv", {"n": 3})
    # A tenant key as older versions kept it: a control-database row, wrapped by k-tenant
    wrapped_id, wrapped = Keyring(keys, ids["k-tenant"]).wrap(os.urandom(32))
    with ctx.ledger.transaction() as cur:
        cur.execute(
            "INSERT INTO dv_tenant_keys (tenant, key_id, kek_id, wrapped_key, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            f"kt{tag}",
            f"tenant-{uuid.uuid4().hex}",
            wrapped_id,
            base64.b64encode(wrapped).decode(),
            datetime.now(UTC).replace(tzinfo=None),
        )
    # And a tenant's export, whose header names that tenant's own key
    tenant_key_id = f"tenant-{uuid.uuid4().hex}"
    tenant_repo = ObjectRepository(
        ctx.repository.store, Keyring({tenant_key_id: os.urandom(32)}, tenant_key_id)
    )
    tenant_repo.put_json(f"tenants/t{tag}/exports/e1.json.dv", {"n": 4})
    return settings, ctx, ids, tenant_key_id


def _keys_list(settings) -> dict:
    listed = run_cli(settings, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)


def test_keys_list_counts_what_each_key_wraps_per_area_and_names_unreadable_objects(keyed_repository) -> None:
    settings, ctx, ids, tenant_key_id = keyed_repository
    # Given also an object that is not deskvault's, and an empty one
    ctx.repository.store.put_bytes("servers/web/notes.txt", b"left here by someone")
    ctx.repository.store.put_bytes("stray-empty", b"")

    listed = _keys_list(settings)

    by_id = {k["id"]: k for k in listed["keys"]}
    assert listed["active"] == ids["k-active"] and listed["objects"] == 7
    assert by_id[ids["k-old"]]["objects"] == 3
    assert by_id[ids["k-old"]]["areas"] == {"servers": 1, "targets": 2}
    assert by_id[ids["k-old"]]["stored_bytes"] > 0
    assert by_id[ids["k-old"]]["tenant_keys"] == 0 and by_id[ids["k-old"]]["in_use"]
    assert by_id[ids["k-tenant"]] | {"stored_bytes": 0} == {
        "id": ids["k-tenant"],
        "active": False,
        "objects": 0,
        "stored_bytes": 0,
        "areas": {},
        "tenant_keys": 1,
        "in_use": True,
    }
    assert (by_id[ids["k-unused"]]["objects"], by_id[ids["k-unused"]]["tenant_keys"]) == (0, 0)
    assert not by_id[ids["k-unused"]]["in_use"]
    assert by_id[ids["k-active"]]["active"] and by_id[ids["k-active"]]["areas"] == {"targets": 1}
    # The tenant's export names its tenant key, which the control database holds
    assert [(o["id"], o["kind"], o["areas"]) for o in listed["other_key_ids"]] == [
        (tenant_key_id, "tenant key", {"tenants": 1})
    ]
    # And the objects whose header names no key are listed with why, not skipped
    unreadable = {u["key"]: u["reason"] for u in listed["unreadable"]}
    assert set(unreadable) == {"servers/web/notes.txt", "stray-empty"}
    assert "not a deskvault object" in unreadable["servers/web/notes.txt"]

    # The text output says the same
    text = run_cli(settings, "keys", "list")
    assert text.returncode == 0, text.stderr
    assert f"{ids['k-old']}  in use" in text.stdout and "targets 2" in text.stdout
    assert f"{ids['k-unused']}  unused" in text.stdout
    assert "unreadable: 2 object(s)" in text.stdout and "servers/web/notes.txt" in text.stdout


def test_keys_retire_refuses_a_used_key_and_removes_an_unused_one(keyed_repository, key_file: Path) -> None:
    settings, ctx, ids, _ = keyed_repository
    before = key_file.read_bytes()

    # A key objects need, one a tenant key needs, the active key and an unknown one are refused
    for name, code, fragment in (
        ("k-old", 1, "3 object(s) (servers 1, targets 2) are wrapped by it"),
        ("k-tenant", 1, "1 legacy tenant key(s) in the control database (dv_tenant_keys) are wrapped"),
        ("k-active", 2, "is the active key"),
    ):
        refused = run_cli(settings, "keys", "retire", ids[name])
        assert refused.returncode == code, refused.stdout + refused.stderr
        assert fragment in refused.stderr and ids[name] in refused.stderr
    unknown = run_cli(settings, "keys", "retire", "k-nowhere")
    assert unknown.returncode == 2 and "holds no key 'k-nowhere'" in unknown.stderr
    # An object whose header cannot be read might need any key: nothing is retired while it is there
    ctx.repository.store.put_bytes("targets/main/odd.bin", b"PK\x03\x04 not ours")
    refused = run_cli(settings, "keys", "retire", ids["k-unused"])
    assert refused.returncode == 1 and "targets/main/odd.bin" in refused.stderr
    assert key_file.read_bytes() == before

    # When the stray object is gone, the unused key is retired
    ctx.repository.store.delete("targets/main/odd.bin")
    retired = run_cli(settings, "keys", "retire", ids["k-unused"])
    assert retired.returncode == 0, retired.stdout + retired.stderr

    # Then the file holds every other key, still 0600, and everything still reads
    doc = json.loads(key_file.read_text())
    assert set(doc["keys"]) == {ids["k-old"], ids["k-tenant"], ids["k-active"]}
    assert doc["active"] == ids["k-active"] and "chunk_naming" in doc
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    repo = worker_context(settings).repository
    assert repo.get_json("targets/main/backups/a/manifest.json.dv") == {"n": 1}
    assert repo.get_json("targets/main/backups/b/manifest.json.dv") == {"n": 3}
    listed = _keys_list(settings)
    assert ids["k-unused"] not in {k["id"] for k in listed["keys"]}
