"""The S3 store a benchmark compares tools on: one SeaweedFS serving HTTPS (and plain HTTP beside it).

Both tools reach it over HTTPS, as the policy's TLS in transit has them deployed: deskvault checking the
certificate against the benchmark's CA bundle (`tls_endpoint`, `ca_bundle`), pgBackRest with certificate
checks off (its option for a self-signed store) and path-style URIs. The shared SeaweedFS of
`.deskvault` is used when it already listens on HTTPS too; otherwise the benchmark starts one of its
own (free ports, state in the scratch folder, a self-signed certificate) and stops it at the end,
leaving every other SeaweedFS alone.
"""

from __future__ import annotations

import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, log
from deskvault.local import seaweedfs
from deskvault.local.certs import self_signed_cert


@dataclass
class BenchS3:
    """Where the benchmark's SeaweedFS serves S3: `endpoint` (HTTP), `https_port` and its certificate."""

    endpoint: seaweedfs.S3Endpoint
    https_port: int
    ca_bundle: Path  # the certificate HTTPS presents: a CA of one
    state: Path | None  # the state dir of a SeaweedFS this benchmark started (None: the shared one)

    @property
    def tls_endpoint(self) -> seaweedfs.S3Endpoint:
        """The same store and credentials over HTTPS: what deskvault uses in a benchmark."""
        e = self.endpoint
        url = f"https://{self.host}:{self.https_port}"
        return seaweedfs.S3Endpoint(url, e.access_key, e.secret_key, e.region)

    @property
    def host(self) -> str:
        return seaweedfs.HOST

    @property
    def owned(self) -> bool:
        return self.state is not None

    def describe(self) -> str:
        who = "started by this benchmark" if self.owned else "the shared one of .deskvault"
        return (
            f"SeaweedFS on {self.host} ({who}), both tools over HTTPS port {self.https_port}: deskvault "
            "checking its certificate, pgBackRest with repo1-storage-verify-tls=n and path-style URIs"
        )

    def stop(self) -> None:
        if self.state is not None:
            seaweedfs.stop(self.state)


def start(scratch: Path) -> BenchS3:
    """The shared SeaweedFS if it serves HTTPS as well, else a new one of the benchmark's own."""
    shared = _shared_with_https()
    if shared is not None:
        log(f"S3: the shared SeaweedFS serves HTTPS on port {shared.https_port}; both tools use it")
        return shared
    state = scratch / "seaweed-state"
    state.mkdir(mode=0o700)
    cert, key = self_signed_cert(state)
    port = _free_base_port()
    endpoint = seaweedfs.ensure_running(state, s3_port=port, https=(port + 5, cert, key))
    log(f"S3: started a SeaweedFS of the benchmark's own: HTTP {endpoint.endpoint_url}, HTTPS {port + 5}")
    return BenchS3(endpoint, port + 5, cert, state)


def _shared_with_https() -> BenchS3 | None:
    home = ROOT / ".deskvault" / "seaweedfs"
    try:
        pid = int((home / "weed.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError):
        return None
    if f"-dir={home.resolve() / 'data'}" not in cmdline:
        return None  # a stale pid file; the pid belongs to something else now
    flags = dict(re.match(r"-([\w.]+)=(.*)", a).groups() for a in cmdline if re.match(r"-[\w.]+=", a))
    if not {"s3.port.https", "s3.port", "s3.cert.file"} <= flags.keys():
        return None
    endpoint = seaweedfs.ensure_running(ROOT / ".deskvault", s3_port=int(flags["s3.port"]))
    return BenchS3(endpoint, int(flags["s3.port.https"]), Path(flags["s3.cert.file"]), None)


def _free_base_port() -> int:
    """A port whose neighbours `ensure_running` derives (-3..+1, their gRPC twins, +5 for HTTPS) are free."""
    for _ in range(100):
        base = random.randrange(40000, 50000, 10)
        ports = [*range(base - 3, base + 2), *range(base + 10000 - 3, base + 10000 + 2), base + 5]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError("found no free block of ports for the benchmark's SeaweedFS")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((seaweedfs.HOST, port))
        except OSError:
            return False
    return True


def stored_bytes(client, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every object under `prefix`."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [(o["Key"], o["Size"]) for o in page.get("Contents", ())]
    return found
