"""What the read-only HTTPS endpoint behind the admin panel's Import and Export page decides.

  GET /v1/tenants/<id>/exports                 Authorization: Bearer <the tenant's token>
      the tenant's downloads as JSON, each with a fresh signed link
  GET /v1/tenants/<id>/exports/<export>/dump?expires=<unix time>&signature=<hex>
      the pg_dump file itself, decrypted on the fly

The server itself (connections, limits, ranges) is `download_endpoint`.

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
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from deskvault_core.errors import ConfigError
from workers.context import WorkerContext
from workers.tenants import exports
from workers.tenants.keys import TenantKeyDestroyed, tenant_repository

log = logging.getLogger(__name__)

# What a well-formed token, expiry and signature look like; anything else is refused before any
# comparison (hmac.compare_digest takes ASCII strings only).
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


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

    def token_problem(self, tenant: str, authorization: str | None) -> tuple[int, str] | None:
        """Why a listing request is refused (401: no usable bearer token, 403: not this tenant's), or None."""
        if not authorization:
            return 401, "send the tenant's token as `Authorization: Bearer <token>`"
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
            return 401, "the Authorization header is not `Bearer <token>` with a deskvault tenant token"
        if not hmac.compare_digest(token, self.tenant_token(tenant)):
            return 403, "this token does not grant access to this tenant's downloads"
        return None

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
        """Why a download link is refused (HTTP status and reason), or None if it is good.

        `query` maps each parameter to all its values: a parameter given twice is refused, not guessed.
        """
        expires_values, signatures = query.get("expires", []), query.get("signature", [])
        if len(expires_values) != 1 or not _EXPIRES.fullmatch(expires_values[0]):
            return 403, "the link is incomplete: expires is missing or not a number"
        if len(signatures) != 1 or not _SIGNATURE.fullmatch(signatures[0]):
            return 403, "the link is incomplete: signature is missing or not 64 hex digits"
        expires, signature = int(expires_values[0]), signatures[0]
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
