"""The HTTPS server in front of `DownloadService`: uvicorn (asyncio, h11) running a Starlette app.

  GET|HEAD /v1/tenants/<id>/exports                      Authorization: Bearer <the tenant's token>
  GET|HEAD /v1/tenants/<id>/exports/<export>/dump?expires=...&signature=...   (Range: bytes=... too)
  GET|HEAD /healthz                                      for load balancers; touches nothing

Why not `http.server`: it did the TLS handshake in its accept loop, so one client that connected and
sent nothing stopped every other tenant's downloads, and each connection held a thread. Here a
connection costs a coroutine until its request is read; blocking work (the object store) runs in a
bounded pool of threads. What bounds a client (all in `[downloads]`):
  - the TLS handshake must finish within `handshake_timeout_seconds`;
  - a request's headers must all arrive within `header_timeout_seconds` of the connection (or of the
    previous response), however slowly they trickle in; a kept-alive connection with nothing more to
    ask is closed after `idle_timeout_seconds`;
  - a download whose client reads nothing for `send_timeout_seconds` is cut off;
  - `max_connections` connections at once (more are closed at once), `max_downloads` dumps streamed at
    once (more get 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from deskvault_core.config import DownloadSettings
from deskvault_core.errors import ConfigError
from workers.repository.errors import RepositoryError
from workers.tenants import exports
from workers.tenants.downloads import DownloadService
from workers.tenants.keys import TenantKeyDestroyed, tenant_repository

log = logging.getLogger(__name__)

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_EXPORT = re.compile(r"^[0-9A-Za-z-]{1,64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Every response: never cached (lists and links are per tenant and short-lived), HTTPS only from now
# on, no content sniffing, no page may frame or script anything, links never leak through Referer.
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "strict-transport-security": "max-age=31536000",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "server": "deskvault",
}


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The inclusive byte range a `Range` header asks of `size` bytes.

    None: serve the whole body (no header, or one this server ignores, as RFC 9110 allows: another
    unit or several ranges); "unsatisfiable": answer 416.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(size - length, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return "unsatisfiable"
    return start, end


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


class DumpResponse(Response):
    """One export's dump (or a byte range of it), decrypted as it is sent, never buffered whole.

    A client that reads nothing for `send_timeout` seconds is cut off. If the object turns out to be
    damaged after the status went out, the connection is cut, so the client sees a short download
    rather than bad bytes presented as complete.
    """

    def __init__(
        self,
        open_plain: Callable[[], Iterator[bytes]],
        *,
        status: int,
        headers: dict[str, str],
        span: tuple[int, int],
        size: int,
        endpoint: DownloadEndpoint,
        what: str,
    ) -> None:
        super().__init__(status_code=status, headers=headers, media_type="application/octet-stream")
        self.open_plain = open_plain
        self.span = span
        self.size = size
        self.endpoint = endpoint
        self.what = what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held = scope["method"] != "HEAD"  # a HEAD takes no download slot

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.endpoint.downloads.release()

        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            # The slot is freed as soon as the last byte is out, before the stream is closed and the
            # response ended: a client that starts its next download as soon as it has every byte of
            # this one (its Content-Length says when) must find the slot free, not a 503.
            if (
                scope["method"] == "HEAD"
                or self.span[1] < self.span[0]
                or await self._send_span(send, release)
            ):
                release()
                await send({"type": "http.response.body", "body": b""})
        finally:
            release()

    async def _send_span(self, send: Send, sent: Callable[[], None]) -> bool:
        """Send the span's bytes; True when all went out (`sent()` is called the moment they did)."""
        start, end = self.span
        # Reading on past the span's end only when it is the object's end: that is where the SHA-256
        # over the whole dump is checked.
        read_to_end = end == self.size - 1
        run = self.endpoint.run_blocking
        plain = await run(self.open_plain)
        position = 0
        try:
            while True:
                try:
                    chunk = await run(next, plain, None)
                except RepositoryError as e:
                    log.error("download of %s stopped: %s", self.what, e)
                    return False
                if chunk is None:
                    sent()
                    return True
                low, position = position, position + len(chunk)
                piece = chunk[max(start - low, 0) : max(min(end + 1, position) - low, 0)]
                if piece:
                    try:
                        with anyio.fail_after(self.endpoint.settings.send_timeout_seconds):
                            await send({"type": "http.response.body", "body": piece, "more_body": True})
                    except TimeoutError:
                        log.warning(
                            "download of %s cut off: the client read nothing for %d s",
                            self.what,
                            self.endpoint.settings.send_timeout_seconds,
                        )
                        return False
                if position > end and not read_to_end:
                    sent()
                    return True
        finally:
            with anyio.CancelScope(shield=True):
                await run(_close, plain)


def _close(iterator: Iterator[bytes]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class _SecurityHeaders:
    """Adds SECURITY_HEADERS to every response and logs each request by its path, never its query
    (which holds a link's signature)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.monotonic()
        status = 0

        async def with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in names
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            log.info("%s %s -> %s (%.3f s)", scope["method"], scope["path"], status, time.monotonic() - began)


class DownloadEndpoint:
    """The app and the server of one `DownloadService`; `serve()` blocks, `start()` runs it in a thread."""

    def __init__(self, service: DownloadService) -> None:
        self.service = service
        self.settings: DownloadSettings = service.settings
        if not (self.settings.tls_cert and self.settings.tls_key):
            raise ConfigError(
                "downloads.tls_cert / downloads.tls_key: the download endpoint serves HTTPS only; "
                "point both at a certificate and its private key (PEM)"
            )
        self._tls = _tls_context(self.settings)
        # Object-store calls run in these threads, a few more than downloads so listings still get one.
        self._threads = anyio.CapacityLimiter(self.settings.max_downloads + 4)
        self.downloads = _Slots(self.settings.max_downloads)
        self.app = _SecurityHeaders(
            Starlette(
                routes=[
                    Route("/healthz", self._health, methods=["GET"]),
                    Route("/v1/tenants/{tenant}/exports", self._list, methods=["GET"]),
                    Route("/v1/tenants/{tenant}/exports/{export}/dump", self._dump, methods=["GET"]),
                ],
                exception_handlers={404: self._not_found, 405: self._not_allowed},
            )
        )
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=self.settings.host,
                port=self.settings.port,
                http=_guarded_protocol(self.settings),
                ssl_context_factory=lambda _config, _default: self._tls,
                timeout_keep_alive=self.settings.idle_timeout_seconds,
                h11_max_incomplete_event_size=16 * 1024,
                server_header=False,
                access_log=False,  # ours logs paths only: a query holds a link's signature
                log_config=None,
                lifespan="off",
            )
        )
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    async def run_blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(function, *args, limiter=self._threads)

    # --- running -------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until SIGINT or SIGTERM (when called from the main thread) or `stop()`."""
        with asyncio.Runner(loop_factory=lambda: _BoundedHandshakeLoop(self.settings)) as runner:
            runner.run(self._server.serve())
        if not self._server.started:
            raise ConfigError(
                f"downloads.host / downloads.port: could not listen on {self.settings.host}:"
                f"{self.settings.port} (taken, or not an address of this host); see the log above"
            )

    def start(self, timeout: float = 10.0) -> DownloadEndpoint:
        """Serve in a thread of its own; returns once it listens, raises if it could not."""

        def run() -> None:
            try:
                self.serve()
            except BaseException as e:  # uvicorn exits the thread with SystemExit when it can't bind
                self._failure = e

        self._thread = threading.Thread(target=run, name="downloads", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(
                    f"downloads: the endpoint did not start on {self.settings.host}:{self.settings.port}"
                    f" ({self._failure!r})"
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)

    # --- routes --------------------------------------------------------------------------------------

    async def _health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _not_found(self, _request: Request, _exc: Exception) -> Response:
        return error(404, "no such resource")

    async def _not_allowed(self, _request: Request, _exc: Exception) -> Response:
        return error(405, "only GET and HEAD are served", {"allow": "GET, HEAD"})

    async def _list(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        if not _TENANT.match(tenant):
            return error(404, "no such resource")
        if problem := self.service.token_problem(tenant, request.headers.get("authorization")):
            status, reason = problem
            headers = {"www-authenticate": 'Bearer realm="deskvault-downloads"'} if status == 401 else None
            return error(status, reason, headers)
        try:
            listing = await self.run_blocking(self.service.listing, tenant)
        except RepositoryError as e:
            log.error("listing downloads of %s failed: %s", tenant, e)
            return error(
                503, "the downloads cannot be listed right now; try again later", {"retry-after": "30"}
            )
        return Response(json.dumps(listing), media_type="application/json")

    async def _dump(self, request: Request) -> Response:
        tenant, export = request.path_params["tenant"], request.path_params["export"]
        if not (_TENANT.match(tenant) and _EXPORT.match(export)):
            return error(404, "no such resource")
        query = {name: request.query_params.getlist(name) for name in ("expires", "signature")}
        if problem := self.service.link_problem(tenant, export, query):
            return error(*problem)
        repo, manifest = await self.run_blocking(self._find, tenant, export)
        if manifest is None:
            return error(404, "no such export (it may have been deleted)")
        if exports.expired_at(manifest, self.service.clock()):
            return error(410, "this export has expired; request a new one")
        size = manifest["plain_size"]
        etag = f'"{manifest["sha256"]}"'
        headers = {
            "accept-ranges": "bytes",
            "etag": etag,
            "content-disposition": f'attachment; filename="{tenant}-{export}.dump"',
        }
        span: tuple[int, int] | str | None = None
        if_range = request.headers.get("if-range")
        if if_range is None or if_range == etag:  # a resumed download of other contents starts over
            span = parse_range(request.headers.get("range"), size)
        if span == "unsatisfiable":
            return error(416, "the requested range is outside the dump", {"content-range": f"bytes */{size}"})
        status = 200
        if isinstance(span, tuple):
            status = 206
            headers["content-range"] = f"bytes {span[0]}-{span[1]}/{size}"
        else:
            span = (0, size - 1)
        headers["content-length"] = str(span[1] - span[0] + 1)
        if request.method != "HEAD" and not self.downloads.acquire():
            return error(
                503,
                f"{self.settings.max_downloads} downloads are running; try again shortly",
                {"retry-after": "5"},
            )

        def open_plain() -> Iterator[bytes]:
            return repo.get_stream(manifest["dump_key"], expect_sha256=manifest["sha256"], expect_size=size)

        return DumpResponse(
            open_plain,
            status=status,
            headers=headers,
            span=span,
            size=size,
            endpoint=self,
            what=f"export {export} of {tenant}",
        )

    def _find(self, tenant: str, export: str) -> tuple[Any, dict[str, Any] | None]:
        try:
            repo = tenant_repository(self.service.ctx, tenant)
            return repo, exports.find_export(repo, tenant, export)
        except (TenantKeyDestroyed, RepositoryError):
            return None, None


class _Slots:
    """A counter of running downloads that never waits: a full house is answered with 503 at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.taken >= self.size:
                return False
            self.taken += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.taken -= 1


def _tls_context(settings: DownloadSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"downloads.tls_cert / downloads.tls_key: cannot load the certificate and key "
            f"({settings.tls_cert}, {settings.tls_key}): {e}"
        ) from None
    return context


class _BoundedHandshakeLoop(asyncio.SelectorEventLoop):
    """An event loop whose TLS servers drop a handshake that takes longer than the configured limit.

    uvicorn creates its server with asyncio's defaults (60 s for the handshake); this is the one place
    the limit can be set without reaching into uvicorn's internals.
    """

    def __init__(self, settings: DownloadSettings) -> None:
        super().__init__()
        self._handshake_timeout = float(settings.handshake_timeout_seconds)

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self._handshake_timeout)
            kwargs.setdefault("ssl_shutdown_timeout", self._handshake_timeout)
        return await super().create_server(*args, **kwargs)


def _guarded_protocol(settings: DownloadSettings) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a cap on connections and a deadline for each request's headers.

    uvicorn's own keep-alive timer starts only after a response and stops at the first byte of the
    next request, so a client trickling a request's headers a byte at a time would be kept forever.
    """
    header_timeout = float(settings.header_timeout_seconds)
    max_connections = settings.max_connections

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Closing ones still wait for the peer's TLS close_notify: they do not count.
            if sum(not c.transport.is_closing() for c in self.connections) > max_connections:
                log.warning("connection refused: %d connections are open already", max_connections)
                transport.abort()
                return
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            self._arm_header_deadline()
            super().on_response_complete()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(header_timeout, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle_when_armed: object) -> None:
            # Nothing new began since the deadline was set, and nothing is in progress: the next
            # request's headers did not arrive in time.
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is cycle_when_armed and idle and not self.transport.is_closing():
                self.transport.abort()  # no TLS goodbye: a client this slow would not read it either

    return GuardedH11Protocol
