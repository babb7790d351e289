"""Exports end to end: pg_dump of a real tenant database, stored under the tenant's key in SeaweedFS,
listed and downloaded over HTTPS (a certificate made by the test), restored with pg_restore.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest
from support import (
    OutboundListener,
    clocked_context,
    free_port,
    run_cli,
    self_signed_cert,
    wait_for,
)

from messages.events import ExportRequested
from messages.schema_files import SCHEMA_DIR
from workers.engines.postgresql.cluster import DEFAULT_PG_BIN
from workers.errors import PermanentError
from workers.handlers.export import handle_export_requested
from workers.tenants import exports
from workers.tenants.download_endpoint import DownloadEndpoint
from workers.tenants.downloads import DownloadService
from workers.tenants.keys import keystore_key, tenant_prefix, tenant_repository
from workers.tenants.registry import UnknownTenant

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
FINGERPRINT = "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM tickets t"


@pytest.fixture
def export_case(make_settings, pg_target, tmp_path):
    """Two tenants with databases on the target, a download endpoint on HTTPS, one injected clock."""
    first, second = (f"x{uuid.uuid4().hex[:10]}" for _ in range(2))
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    extra = "".join(
        f'[tenants.{name}]\nplan = "company"\ndatabase = "{name}"\ntarget = "main"\n'
        for name in (first, second)
    )
    extra += (
        f'[downloads]\nport = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        f'link_secret = "{uuid.uuid4().hex}{uuid.uuid4().hex}"\npublic_url = "https://127.0.0.1:{port}"\n'
        "scheduled_keep = 2\n"
    )
    settings = make_settings(extra=extra)
    ctx, clock = clocked_context(settings, NOW)
    for name in (first, second):
        pg_target.psql(f"CREATE DATABASE {name}")
        pg_target.psql(
            "CREATE TABLE tickets (id int PRIMARY KEY, subject text, body text);"
            f"INSERT INTO tickets SELECT g, '{name} ticket ' || g, repeat(md5(g::text), 20)"
            " FROM generate_series(1, 5000) g",
            name,
        )
    service = DownloadService(ctx, clock=clock)
    endpoint = DownloadEndpoint(service).start()
    tls = ssl.create_default_context(cafile=str(cert))
    yield ctx, clock, (first, second), pg_target, service, tls
    endpoint.stop()


def _get(url: str, tls: ssl.SSLContext, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, context=tls, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_an_export_downloaded_through_its_link_restores_with_identical_contents(
    export_case, tmp_path
) -> None:
    ctx, _, (tenant, _), cluster, service, tls = export_case
    event = ExportRequested.new(
        tenant=tenant, request_id="EXP-1", requested_by="ann@example.com", occurred_at=NOW
    )
    outcome = handle_export_requested(ctx, event)
    assert f"of tenant {tenant} ready" in outcome and "downloadable until 2026-12-09T12:00:00Z" in outcome
    assert handle_export_requested(ctx, event) is None  # redelivered: one export

    base = ctx.settings.downloads.public_url
    status, body = _get(f"{base}/v1/tenants/{tenant}/exports", tls, service.tenant_token(tenant))
    assert status == 200
    (download,) = json.loads(body)["downloads"]
    assert download["request_id"] == "EXP-1" and download["kind"] == "on-request"

    status, dump = _get(download["download_url"], tls)
    assert status == 200 and len(dump) == download["size_bytes"]
    dump_file = tmp_path / "export.dump"
    dump_file.write_bytes(dump)
    restored = f"r{uuid.uuid4().hex[:10]}"
    cluster.psql(f"CREATE DATABASE {restored}")
    subprocess.run(
        [
            str(DEFAULT_PG_BIN / "pg_restore"),
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "-d",
            restored,
            "--no-owner",
            str(dump_file),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert cluster.psql(FINGERPRINT, restored) == cluster.psql(FINGERPRINT, tenant)
    # Nothing in the bucket is readable without the tenant's key, and it holds no plaintext.
    assert b"ticket 1" not in ctx.repository.store.get_bytes(download_key(tenant, download["export_id"]))


def download_key(tenant: str, export: str) -> str:
    return exports.dump_key(tenant, export)


def test_links_expire_and_cannot_be_altered(export_case) -> None:
    ctx, clock, (tenant, _), _, service, tls = export_case
    handle_export_requested(
        ctx, ExportRequested.new(tenant=tenant, request_id="EXP-2", requested_by="ann", occurred_at=NOW)
    )
    base = ctx.settings.downloads.public_url
    (download,) = json.loads(
        _get(f"{base}/v1/tenants/{tenant}/exports", tls, service.tenant_token(tenant))[1]
    )["downloads"]
    url = download["download_url"]

    tampered = url.replace("expires=", "expires=9") if "expires=" in url else url
    assert _get(tampered, tls)[0] == 403
    assert _get(url.replace(tenant, "someoneelse", 1), tls)[0] == 403

    clock.now = NOW + timedelta(minutes=61)  # links last an hour
    status, body = _get(url, tls)
    assert status == 410 and "expired" in json.loads(body)["error"]

    clock.now = NOW + timedelta(days=8)  # and the export itself a week: no longer listed
    assert (
        json.loads(_get(f"{base}/v1/tenants/{tenant}/exports", tls, service.tenant_token(tenant))[1])[
            "downloads"
        ]
        == []
    )


def test_no_tenant_sees_another_tenants_downloads(export_case) -> None:
    ctx, _, (first, second), _, service, tls = export_case
    handle_export_requested(
        ctx, ExportRequested.new(tenant=first, request_id="EXP-3", requested_by="ann", occurred_at=NOW)
    )
    base = ctx.settings.downloads.public_url
    assert _get(f"{base}/v1/tenants/{first}/exports", tls, service.tenant_token(second))[0] == 403
    assert _get(f"{base}/v1/tenants/{first}/exports", tls)[0] == 401  # no token at all
    status, body = _get(f"{base}/v1/tenants/{second}/exports", tls, service.tenant_token(second))
    assert status == 200 and json.loads(body)["downloads"] == []


def test_a_server_certificate_the_client_does_not_trust_is_refused(export_case) -> None:
    ctx, _, (first, _), _, service, _ = export_case
    url = f"{ctx.settings.downloads.public_url}/v1/tenants/{first}/exports"
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(url, ssl.create_default_context(), service.tenant_token(first))


def test_bad_export_requests_are_refused_and_leave_nothing(export_case) -> None:
    ctx, _, (tenant, _), _, _, _ = export_case
    with pytest.raises(UnknownTenant, match="tenant: 'nobody' is not a known tenant"):
        handle_export_requested(ctx, ExportRequested.new(tenant="nobody", request_id="E", requested_by="a"))
    before = NOW - timedelta(days=400)
    with pytest.raises(
        PermanentError, match=r"as_of: target main has no full backup yet|as_of: .* is before"
    ):
        handle_export_requested(
            ctx, ExportRequested.new(tenant=tenant, request_id="E", requested_by="a", as_of=before)
        )
    assert list(ctx.repository.list_keys(tenant_prefix(tenant))) == []
    assert not ctx.repository.exists(keystore_key(tenant))  # not even a key was made


def test_an_export_for_a_purged_tenant_is_refused(export_case) -> None:
    ctx, _, (tenant, _), _, _, _ = export_case
    tenant_repository(ctx, tenant, create=True)
    ctx.ledger.set_legal_hold(tenant, False)  # creates the account row
    with ctx.ledger.transaction() as cur:
        cur.execute("UPDATE dv_accounts SET status = 'purged' WHERE tenant = ?", tenant)
    with pytest.raises(
        PermanentError, match=rf"tenant: {tenant} was purged; there is no data left to export"
    ):
        handle_export_requested(ctx, ExportRequested.new(tenant=tenant, request_id="E", requested_by="a"))


def test_exports_list_and_tenant_token_from_the_cli(export_case) -> None:
    ctx, _, (tenant, _), _, service, _ = export_case
    handle_export_requested(
        ctx, ExportRequested.new(tenant=tenant, request_id="EXP-9", requested_by="ann", occurred_at=NOW)
    )
    listed = run_cli(ctx.settings, "exports", "list", "--tenant", tenant, "--json")
    assert listed.returncode == 0, listed.stderr
    (manifest,) = json.loads(listed.stdout)
    assert (manifest["tenant"], manifest["request_id"], manifest["as_of"]) == (tenant, "EXP-9", None)
    table = run_cli(ctx.settings, "exports", "list", "--tenant", tenant)
    assert manifest["export_id"] in table.stdout and "EXP-9" in table.stdout

    token = run_cli(ctx.settings, "tenants", "token", "--tenant", tenant)
    assert token.returncode == 0, token.stderr
    assert token.stdout.strip() == service.tenant_token(tenant)
    assert ctx.settings.downloads.link_secret not in token.stdout + token.stderr


def test_a_finished_export_is_announced_on_the_outbound_exchange(export_case) -> None:
    ctx, _, (tenant, _), _, _, _ = export_case
    listener = OutboundListener(ctx.settings.broker.url, "export-ready")
    try:
        event = ExportRequested.new(tenant=tenant, request_id="EXP-5", requested_by="ann", occurred_at=NOW)
        handle_export_requested(ctx, event)
        (message,) = wait_for(listener.messages, what="export-ready on deskvault.outbound")
    finally:
        listener.close()
    jsonschema.validate(message, load_outbound_schema("export-ready"))
    assert (message["tenant"], message["request_id"], message["kind"]) == (tenant, "EXP-5", "on-request")
    assert message["expires_at"] == "2026-12-09T12:00:00Z"


def load_outbound_schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / "outbound" / f"{name}.v1.schema.json").read_text())


def test_scheduled_exports_keep_the_newest_and_expired_ones_go(export_case) -> None:
    ctx, clock, (tenant, _), _, service, tls = export_case
    on_request = ExportRequested.new(tenant=tenant, request_id="EXP-7", requested_by="ann", occurred_at=NOW)
    handle_export_requested(ctx, on_request)
    for night in range(3):
        clock.now = NOW + timedelta(days=3 * night + 1)
        event = ExportRequested.new(
            tenant=tenant,
            request_id=f"scheduled-{night}",
            requested_by="deskvault scheduler",
            kind="scheduled",
            occurred_at=clock.now,
        )
        handle_export_requested(ctx, event)
    # Night 3 is 7 days after NOW: the on-request export has expired; of the scheduled, two are kept.
    kept = exports.list_exports(tenant_repository(ctx, tenant), tenant)
    assert [(m["kind"], m["request_id"]) for m in kept] == [
        ("scheduled", "scheduled-1"),
        ("scheduled", "scheduled-2"),
    ]
    assert (
        len(list(ctx.repository.list_keys(exports.exports_prefix(tenant)))) == 4
    )  # two dumps, two manifests
    base = ctx.settings.downloads.public_url
    listed = json.loads(_get(f"{base}/v1/tenants/{tenant}/exports", tls, service.tenant_token(tenant))[1])
    assert [d["request_id"] for d in listed["downloads"]] == ["scheduled-1", "scheduled-2"]
