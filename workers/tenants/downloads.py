"""The read-only HTTPS endpoint behind the admin panel's Import and Export page.

  GET /v1/tenants/<id>/exports                 Authorization: Bearer <the tenant's token>
      the tenant's downloads as JSON, each with a fresh signed link
  GET /v1/tenants/<id>/exports/<export>/dump?expires=<unix time>&signature=<hex>
      the pg_dump file itself, decrypted on the fly

Why an endpoint that decrypts, not a presigned S3 URL over server-side encryption: exports are encrypted
with the tenant's own key so that a purge destroys them by destroying that key, and the object store
never holds plaintext or a key that opens it. A presigned URL could only hand out that ciphertext, and
SSE-C would need every browser to send the key. The endpoint serves TLS only; a link is an HMAC over
(tenant, export, expiry) and opens nothing else; a tenant's token is an HMAC of its id, so one tenant's
token never lists another's downloads. Rotating `downloads.link_secret` revokes every link and token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deskvault_core.errors import ConfigError
from workers.context import WorkerContext
from workers.repository.errors import RepositoryError
from workers.tenants import exports
from workers.tenants.keys import TenantKeyDestroyed, tenant_repository

log = logging.getLogger(__name__)

_LIST = re.compile(r"^/v1/tenants/([a-z0-9][a-z0-9_-]{0,62})/exports$")
_DUMP = re.compile(r"^/v1/tenants/([a-z0-9][a-z0-9_-]{0,62})/exports/([0-9A-Za-z-]{1,64})/dump$")
_CHUNK = 1024 * 1024


class DownloadService:
    """Tokens, signed links and the lookups the endpoint makes; the clock is injectable for tests."""

    def __init__(self, ctx: WorkerContext, clock: Callable[[], datetime] | None = None) -> None:
        secret = ctx.settings.downloads.link_secret
        if len(secret) < 32:
            raise ConfigError(
                "downloads.link_secret: set at least 32 random characters (e.g. `openssl rand -hex 32`); "
                "it signs download links and tenant tokens"
            )
        self.ctx = ctx
        self.settings = ctx.settings.downloads
        self._secret = secret.encode()
        self.clock = clock or (lambda: datetime.now(UTC))

    def tenant_token(self, tenant: str) -> str:
        """The bearer token the admin panel sends to list `tenant`'s downloads."""
        mac = hmac.new(self._secret, f"tenant-token:{tenant}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def token_matches(self, tenant: str, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.tenant_token(tenant))

    def _signature(self, tenant: str, export: str, expires: int) -> str:
        return hmac.new(
            self._secret, f"dump:{tenant}:{export}:{expires}".encode(), hashlib.sha256
        ).hexdigest()

    def link(self, tenant: str, manifest: dict[str, Any]) -> tuple[str, datetime]:
        """A download link for one export and when it stops working (never after the export expires)."""
        until = self.clock() + timedelta(minutes=self.settings.link_ttl_minutes)
        if manifest["expires_at"] is not None:
            until = min(until, datetime.fromisoformat(manifest["expires_at"]))
        expires = int(until.timestamp())
        export = manifest["export_id"]
        path = f"/v1/tenants/{tenant}/exports/{export}/dump"
        url = f"{self.settings.public_url.rstrip('/')}{path}?expires={expires}&signature="
        return url + self._signature(tenant, export, expires), until

    def link_problem(self, tenant: str, export: str, query: dict[str, list[str]]) -> tuple[int, str] | None:
        """Why a download link is refused (HTTP status and reason), or None if it is good."""
        try:
            expires = int(query.get("expires", [""])[0])
        except ValueError:
            return 403, "the link is incomplete: expires is missing or not a number"
        signature = query.get("signature", [""])[0]
        if not hmac.compare_digest(signature, self._signature(tenant, export, expires)):
            return 403, "the link's signature does not match; ask the admin panel for a fresh link"
        if self.clock().timestamp() > expires:
            return 410, "the link has expired; ask the admin panel for a fresh link"
        return None

    def listing(self, tenant: str) -> dict[str, Any]:
        now = self.clock()
        downloads = []
        for manifest in self._exports(tenant):
            if exports.expired_at(manifest, now):
                continue
            url, until = self.link(tenant, manifest)
            downloads.append(
                {
                    "export_id": manifest["export_id"],
                    "kind": manifest["kind"],
                    "request_id": manifest["request_id"],
                    "as_of": manifest["as_of"],
                    "created_at": manifest["created_at"],
                    "expires_at": manifest["expires_at"],
                    "size_bytes": manifest["plain_size"],
                    "filename": f"{tenant}-{manifest['export_id']}.dump",
                    "download_url": url,
                    "link_expires_at": until.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            )
        return {"tenant": tenant, "downloads": downloads}

    def _exports(self, tenant: str) -> list[dict[str, Any]]:
        try:
            repo = tenant_repository(self.ctx, tenant)
        except TenantKeyDestroyed:
            return []  # nothing was ever exported, or the tenant was purged
        return exports.list_exports(repo, tenant)


def build_server(service: DownloadService) -> ThreadingHTTPServer:
    """The HTTPS server for `service` (not yet serving); TLS certificate and key are required."""
    settings = service.settings
    if not (settings.tls_cert and settings.tls_key):
        raise ConfigError(
            "downloads.tls_cert / downloads.tls_key: the download endpoint serves HTTPS only; "
            "point both at a certificate and its private key (PEM)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    server = ThreadingHTTPServer((settings.host, settings.port), _handler(service))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def serve_in_thread(service: DownloadService) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = build_server(service)
    thread = threading.Thread(target=server.serve_forever, name="downloads", daemon=True)
    thread.start()
    return server, thread


def _handler(service: DownloadService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "deskvault-downloads"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if match := _LIST.match(parts.path):
                self._list(match.group(1))
            elif match := _DUMP.match(parts.path):
                self._dump(match.group(1), match.group(2), parse_qs(parts.query))
            else:
                self._error(404, "no such resource")

        def _list(self, tenant: str) -> None:
            if not service.token_matches(tenant, self.headers.get("Authorization")):
                self._error(403, "this token does not grant access to this tenant's downloads")
                return
            try:
                body = json.dumps(service.listing(tenant)).encode()
            except RepositoryError as e:
                log.error("listing downloads of %s failed: %s", tenant, e)
                self._error(503, "the downloads cannot be listed right now; try again later")
                return
            self._send(200, "application/json", body)

        def _dump(self, tenant: str, export: str, query: dict[str, list[str]]) -> None:
            if problem := service.link_problem(tenant, export, query):
                self._error(*problem)
                return
            try:
                repo = tenant_repository(service.ctx, tenant)
                manifest = exports.find_export(repo, tenant, export)
            except (TenantKeyDestroyed, RepositoryError):
                manifest = None
            if manifest is None:
                self._error(404, "no such export (it may have been deleted)")
                return
            if exports.expired_at(manifest, service.clock()):
                self._error(410, "this export has expired; request a new one")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(manifest["plain_size"]))
            self.send_header("Content-Disposition", f'attachment; filename="{tenant}-{export}.dump"')
            self.end_headers()
            plain = repo.get_stream(
                manifest["dump_key"], expect_sha256=manifest["sha256"], expect_size=manifest["plain_size"]
            )
            try:
                for chunk in plain:
                    self.wfile.write(chunk)
            except RepositoryError as e:
                # The status is sent already: cut the connection, so the client sees a short download.
                log.error("download of export %s of %s stopped: %s", export, tenant, e)
                self.close_connection = True

        def _error(self, status: int, reason: str) -> None:
            self._send(status, "application/json", json.dumps({"error": reason}).encode())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # The request line holds link signatures: log the path only.
            log.info("%s %s -> %s", self.command, urlsplit(self.path).path, args[1] if len(args) > 1 else "")

    return Handler
