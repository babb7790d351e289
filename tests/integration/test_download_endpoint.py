"""The download endpoint under attack and in daily use: idle, stalled and trickling clients, a cap on
connections, a client that stops reading a download, HEAD and Range (resumable downloads), security
headers, malformed credentials, the health check. Real TLS over 127.0.0.1, real exports of a real
PostgreSQL database, stored encrypted in SeaweedFS.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from support import clocked_context, free_port, self_signed_cert, wait_for

from messages.events import ExportRequested
from workers.handlers.export import handle_export_requested
from workers.tenants.download_endpoint import SECURITY_HEADERS, DownloadEndpoint
from workers.tenants.downloads import DownloadService

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@dataclass
class Endpoint:
    port: int
    tls: ssl.SSLContext
    service: DownloadService
    tenant: str
    ctx: object

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 10
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls, timeout=timeout)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def listing(self, timeout: float = 10) -> tuple[int, dict]:
        token = self.service.tenant_token(self.tenant)
        status, _, body = self.request(
            "GET", f"/v1/tenants/{self.tenant}/exports", {"Authorization": f"Bearer {token}"}, timeout
        )
        return status, json.loads(body)

    def export(self, request_id: str) -> dict:
        handle_export_requested(
            self.ctx,
            ExportRequested.new(
                tenant=self.tenant, request_id=request_id, requested_by="ann", occurred_at=NOW
            ),
        )
        _, body = self.listing()
        return next(d for d in body["downloads"] if d["request_id"] == request_id)

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def tls_socket(self) -> ssl.SSLSocket:
        return self.tls.wrap_socket(self.raw(), server_hostname="127.0.0.1")


@pytest.fixture
def make_endpoint(make_settings, pg_target, tmp_path) -> Iterator[Callable[..., Endpoint]]:
    """An endpoint over one tenant with a database of `rows` tickets; `limits` go into [downloads]."""
    stack = ExitStack()

    def make(limits: str = "", rows: int = 2000, body: str = "repeat(md5(g::text), 10)") -> Endpoint:
        tenant = f"d{uuid.uuid4().hex[:10]}"
        cert, key = self_signed_cert(tmp_path)
        port = free_port()
        settings = make_settings(
            extra=f'[tenants.{tenant}]\nplan = "company"\ndatabase = "{tenant}"\ntarget = "main"\n'
            f'[downloads]\nport = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
            f'link_secret = "{uuid.uuid4().hex}{uuid.uuid4().hex}"\n'
            f'public_url = "https://127.0.0.1:{port}"\n{limits}'
        )
        ctx, _ = clocked_context(settings, NOW)
        pg_target.psql(f"CREATE DATABASE {tenant}")
        pg_target.psql(
            f"CREATE TABLE tickets (id int PRIMARY KEY, body text);"
            f"INSERT INTO tickets SELECT g, {body} FROM generate_series(1, {rows}) g",
            tenant,
        )
        service = DownloadService(ctx)
        endpoint = DownloadEndpoint(service).start()
        stack.callback(endpoint.stop)
        return Endpoint(port, ssl.create_default_context(cafile=str(cert)), service, tenant, ctx)

    yield make
    stack.close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (EOF or reset on read)."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_stalled_clients_do_not_hold_up_a_listing(make_endpoint) -> None:
    endpoint = make_endpoint()
    assert endpoint.listing()[0] == 200
    threads_before = threading.active_count()
    with ExitStack() as stack:
        idle = stack.enter_context(endpoint.raw())  # connected, never says a word
        stalled = []
        for n in range(50):
            if n % 2:  # half a TLS ClientHello record, then nothing
                sock = stack.enter_context(endpoint.raw())
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")
            else:  # TLS done, half a request's headers, then nothing
                sock = stack.enter_context(endpoint.tls_socket())
                sock.sendall(f"GET /v1/tenants/{endpoint.tenant}/exports HTTP/1.1\r\nHost: x\r\n".encode())
            stalled.append(sock)
        began = time.monotonic()
        status, body = endpoint.listing(timeout=5)
        took = time.monotonic() - began
        assert status == 200 and body["tenant"] == endpoint.tenant
        assert took < 2.0, f"a listing took {took:.2f} s behind 1 idle and 50 stalled clients"
        # Idle connections cost no thread: the count is what it was before they came.
        assert threading.active_count() <= threads_before + 2, threading.enumerate()
        assert idle.fileno() > 0 and len(stalled) == 50


def test_slow_and_idle_clients_are_cut_off_by_their_deadlines(make_endpoint) -> None:
    endpoint = make_endpoint(
        "handshake_timeout_seconds = 1\nheader_timeout_seconds = 2\nidle_timeout_seconds = 1\n"
    )
    with endpoint.raw() as silent:  # never starts the handshake
        assert closed_by_server(silent, within=4)
    with endpoint.raw() as half_hello:
        half_hello.sendall(b"\x16\x03\x01\x02\x00\x01")
        assert closed_by_server(half_hello, within=4)
    with endpoint.tls_socket() as no_request:  # handshake done, no request
        assert closed_by_server(no_request, within=5)

    # Slowloris: headers a byte every 0.25 s; each byte is news, but the request is still late.
    with endpoint.tls_socket() as trickle:
        began = time.monotonic()
        request = f"GET /v1/tenants/{endpoint.tenant}/exports HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * 200}"
        try:
            for byte in request.encode():
                trickle.sendall(bytes([byte]))
                time.sleep(0.25)
            cut = closed_by_server(trickle, within=3)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            cut = True
        assert cut and time.monotonic() - began < 6

    # Kept alive after a response, then quiet: closed after the idle timeout.
    with endpoint.tls_socket() as keep_alive:
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert keep_alive.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_by_server(keep_alive, within=4)

    assert endpoint.listing()[0] == 200  # and the endpoint serves on


def test_connections_beyond_the_cap_are_closed_and_service_returns_when_they_go(make_endpoint) -> None:
    endpoint = make_endpoint("max_connections = 5\nheader_timeout_seconds = 2\n")
    with ExitStack() as stack:
        held = [stack.enter_context(endpoint.tls_socket()) for _ in range(5)]
        with endpoint.tls_socket() as one_too_many:
            assert closed_by_server(one_too_many, within=2)
        assert len(held) == 5
        # The held ones send nothing and are cut at the header deadline; then there is room again.
        wait_for(lambda: _answers(endpoint), timeout=10, what="a listing once the held ones are cut")


def test_a_client_that_stops_reading_a_download_is_cut_off_and_frees_its_slot(make_endpoint) -> None:
    # ~20 MiB of dump (random text), more than every socket buffer between the two ends holds.
    endpoint = make_endpoint(
        "max_downloads = 1\nsend_timeout_seconds = 2\n",
        rows=32000,
        body="(SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 32) s(i))",
    )
    download = endpoint.export("BIG-1")
    assert download["size_bytes"] > 16 * 1024 * 1024
    path = urlsplit(download["download_url"])
    target = f"{path.path}?{path.query}"
    threads_before = threading.active_count()
    with endpoint.tls_socket() as stalled:
        stalled.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert stalled.recv(1024).startswith(b"HTTP/1.1 200")
        # The one download slot is taken: another client is told to come back, at once.
        status, headers, _ = endpoint.request("GET", target, timeout=5)
        assert status == 503 and headers["retry-after"] == "5"
        assert endpoint.request("GET", "/healthz")[0] == 200  # the rest of the endpoint is fine
        # The stalled reader is cut off after send_timeout_seconds; the slot is free again.
        wait_for(lambda: _slot_free(endpoint, target), timeout=20, what="the download slot freed")
    status, headers, body = endpoint.request("GET", target, timeout=60)
    assert status == 200 and len(body) == download["size_bytes"]
    assert f'"{hashlib.sha256(body).hexdigest()}"' == headers["etag"]
    assert threading.active_count() <= threads_before + 8


def _answers(endpoint: Endpoint) -> bool:
    try:
        return endpoint.listing(timeout=3)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def _slot_free(endpoint: Endpoint, target: str) -> bool:
    status, _, _ = endpoint.request("HEAD", target, {"Range": "bytes=0-0"}, timeout=5)
    if status != 206:
        return False
    status, _, body = endpoint.request("GET", target, {"Range": "bytes=0-9"}, timeout=5)
    return status == 206 and len(body) == 10


def test_head_and_ranges_resume_a_download_exactly(make_endpoint) -> None:
    endpoint = make_endpoint(rows=4000)
    download = endpoint.export("RNG-1")
    path = urlsplit(download["download_url"])
    target = f"{path.path}?{path.query}"
    size = download["size_bytes"]

    status, headers, full = endpoint.request("GET", target)
    assert status == 200 and len(full) == size and headers["accept-ranges"] == "bytes"
    etag = headers["etag"]
    assert etag == f'"{hashlib.sha256(full).hexdigest()}"'

    status, headers, body = endpoint.request("HEAD", target)
    assert status == 200 and body == b"" and headers["content-length"] == str(size)
    assert headers["etag"] == etag

    # A download broken off after `half` bytes resumes from there and ends identical.
    half = size // 2 + 17
    status, headers, rest = endpoint.request("GET", target, {"Range": f"bytes={half}-", "If-Range": etag})
    assert status == 206 and headers["content-range"] == f"bytes {half}-{size - 1}/{size}"
    assert full[:half] + rest == full

    status, headers, body = endpoint.request("GET", target, {"Range": "bytes=100-199"})
    assert status == 206 and body == full[100:200] and headers["content-length"] == "100"
    status, _, body = endpoint.request("GET", target, {"Range": "bytes=-50"})
    assert status == 206 and body == full[-50:]
    status, _, body = endpoint.request("GET", target, {"Range": f"bytes=0-{size * 2}"})
    assert status == 206 and body == full

    status, headers, _ = endpoint.request("GET", target, {"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    # A resume against other contents (the ETag changed) starts over with the whole dump.
    status, _, body = endpoint.request("GET", target, {"Range": "bytes=10-", "If-Range": '"other"'})
    assert status == 200 and body == full
    # Several ranges at once are not served piecemeal: the whole dump (RFC 9110 allows ignoring).
    status, _, body = endpoint.request("GET", target, {"Range": "bytes=0-1,5-6"})
    assert status == 200 and body == full


def test_every_response_carries_the_security_headers_and_no_server_version(make_endpoint) -> None:
    endpoint = make_endpoint()
    download = endpoint.export("HDR-1")
    path = urlsplit(download["download_url"])
    token = endpoint.service.tenant_token(endpoint.tenant)
    responses = {
        "listing": endpoint.request(
            "GET", f"/v1/tenants/{endpoint.tenant}/exports", {"Authorization": f"Bearer {token}"}
        ),
        "dump": endpoint.request("GET", f"{path.path}?{path.query}"),
        "range": endpoint.request("GET", f"{path.path}?{path.query}", {"Range": "bytes=0-3"}),
        "no token": endpoint.request("GET", f"/v1/tenants/{endpoint.tenant}/exports"),
        "unknown path": endpoint.request("GET", "/nothing/here"),
        "health": endpoint.request("GET", "/healthz"),
        "wrong method": endpoint.request("POST", "/healthz"),
    }
    for name, (status, headers, _) in responses.items():
        for header, value in SECURITY_HEADERS.items():
            assert headers.get(header) == value, (name, status, header, headers)
    assert responses["wrong method"][0] == 405 and responses["wrong method"][1]["allow"] == "GET, HEAD"
    assert responses["unknown path"][0] == 404


def test_malformed_credentials_get_401_or_403_never_a_dropped_connection(make_endpoint) -> None:
    endpoint = make_endpoint()
    download = endpoint.export("BAD-1")
    listing = f"/v1/tenants/{endpoint.tenant}/exports"
    for authorization, expected in [
        (None, 401),
        ("Basic dXNlcjpwYXNz", 401),
        ("Bearer", 401),
        ("Bearer " + "é" * 43, 401),
        ("Bearer " + "\u00ff" * 10 + "A" * 33, 401),
        ("Bearer " + "A" * 43, 403),
        ("Bearer " + "A" * 500, 401),
    ]:
        headers = {"Authorization": authorization} if authorization is not None else {}
        status, response_headers, body = endpoint.request("GET", listing, headers)
        assert status == expected, (authorization, status, body)
        assert "error" in json.loads(body)
        if status == 401:
            assert response_headers["www-authenticate"].startswith("Bearer")

    path = urlsplit(download["download_url"])
    good = dict(part.split("=", 1) for part in path.query.split("&"))
    for query in [
        f"expires={good['expires']}&signature=%C3%A9%C3%A9",
        f"expires={good['expires']}&signature=zz",
        f"expires={good['expires']}&signature={good['signature']}&signature={good['signature']}",
        f"expires=1e9&signature={good['signature']}",
        f"expires=%FF&signature={good['signature']}",
        f"signature={good['signature']}",
        f"expires={good['expires']}&signature={'0' * 64}",
        "",
    ]:
        status, _, body = endpoint.request("GET", f"{path.path}?{query}")
        assert status == 403, (query, status, body)
    # Raw bytes that are not even Latin-1 text, straight onto the wire, in a token and in a signature.
    raw_signature = f"{path.path}?expires={good['expires']}&signature=".encode() + "é".encode() * 64
    for request, expected in [
        (f"GET {listing} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ".encode() + b"\xc3\x28\xff", b"401"),
        (b"GET " + raw_signature + b" HTTP/1.1\r\nHost: x", b"400"),
    ]:
        with endpoint.tls_socket() as sock:
            sock.sendall(request + b"\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 " + expected), request
    assert endpoint.request("GET", f"{path.path}?{path.query}")[0] == 200


def test_the_health_endpoint_answers_without_credentials(make_endpoint) -> None:
    endpoint = make_endpoint()
    status, headers, body = endpoint.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert headers["content-type"] == "application/json"
    status, _, body = endpoint.request("HEAD", "/healthz")
    assert status == 200 and body == b""
