"""A PostgreSQL cluster in a folder of our own: the demo target, the tests' targets, and restored copies.

PostgreSQL refuses to run as root, so when deskvault runs as root the server commands run as the
`postgres` user (`runuser`) and the folder is handed to that user. The system cluster is never touched.
"""

from __future__ import annotations

import errno
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deskvault_core.errors import DeskvaultError
from deskvault_core.processes import process_exists

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
LOG_TAIL_LINES = 20
SOCKET_DIR_PREFIX = "deskvault-pg-"
_LOG_TAIL_BYTES = 64 * 1024  # plenty for LOG_TAIL_LINES; a log of hours of recovery is not read whole


class ClusterError(DeskvaultError):
    """A local PostgreSQL cluster could not be created, started or queried."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUse(ClusterError):
    """The port asked for is taken: a bad input, refused before any work."""

    exit_code = 2


def check_port_free(port: int) -> None:
    """PortInUse unless a server could listen on 127.0.0.1:`port` now."""
    with socket.socket() as s:
        # As PostgreSQL binds: a connection lingering in TIME_WAIT does not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise PortInUse(
                f"--port {port}: 127.0.0.1:{port} is already in use ({e.strerror}); choose a free port, "
                "or leave --port out and a free one is picked"
            ) from e


def log_report(log_file: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Where a server's log is and its last `lines` lines, to end an error message with."""
    try:
        with log_file.open("rb") as f:
            offset = max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES)
            f.seek(offset)
            tail = f.read().decode("utf-8", "replace").splitlines()[1 if offset else 0 :][-lines:]
    except OSError as e:
        return f"server log {log_file} could not be read: {e.strerror}"
    if not tail:
        return f"server log {log_file} is empty"
    return f"server log {log_file}, last {len(tail)} lines:\n" + "\n".join(f"  {line}" for line in tail)


def server_user() -> str | None:
    """The user PostgreSQL's server programs must run as: `postgres` when we are root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else None


def server_ids() -> tuple[int, int] | None:
    """(uid, gid) of the server user when we are root and must hand files to it; else None."""
    user = server_user()
    if user is None:
        return None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def hand_over(path: Path) -> None:
    """Make a folder tree the server user's alone: owned by it (when we are root), and neither group
    nor others may read, write or enter anything in it. Links are changed, never followed."""
    ids = server_ids()
    _make_private(str(path), ids)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            _make_private(os.path.join(root, name), ids)


def _make_private(path: str, ids: tuple[int, int] | None) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP and ids is not None:
            os.lchown(path, *ids)  # a link: its owner only; its mode means nothing
        elif e.errno in (errno.EACCES, errno.ENXIO) and not stat.S_ISLNK((st := os.lstat(path)).st_mode):
            if ids is not None:
                os.lchown(path, *ids)  # (not a link: lchown is chown)
            os.chmod(path, stat.S_IMODE(st.st_mode) & 0o7700)  # unreadable to us, or a socket
        elif e.errno not in (errno.ELOOP, errno.ENOENT):
            raise
        return
    try:
        if ids is not None:
            os.fchown(fd, *ids)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & 0o7700)
    finally:
        os.close(fd)


def _remove_own_socket_dir(socket_dir: Path | None) -> None:
    """A stopped server's socket folder, if it is one `start` made."""
    if socket_dir is not None and socket_dir.name.startswith(SOCKET_DIR_PREFIX):
        shutil.rmtree(socket_dir, ignore_errors=True)


@dataclass
class PgCluster:
    """A server in `datadir`. It listens only on a Unix socket in a folder of its own (0700, the server
    user's), so that no other local user can reach it -- unless `tcp`: a source that backups and
    streams connect to on 127.0.0.1 (the demo target, the tests' targets)."""

    datadir: Path
    port: int
    pg_bin: Path = DEFAULT_PG_BIN
    tcp: bool = False

    @property
    def socket_dir(self) -> Path | None:
        """The running server's socket folder, as its postmaster.pid names it (None: not running)."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return Path(lines[4]) if len(lines) > 4 and lines[4].strip() else None

    @property
    def host(self) -> str:
        if self.tcp:
            return "127.0.0.1"
        if (socket_dir := self.socket_dir) is None:
            raise ClusterError(f"the server in {self.datadir} is not running (no socket folder)")
        return str(socket_dir)

    @property
    def conninfo(self) -> str:
        return f"host={self.host} port={self.port} user=postgres dbname=postgres"

    @property
    def log_file(self) -> Path:
        """Where `start` has the server log: beside the data directory, so it outlives a removed one."""
        return self.datadir.parent / f"{self.datadir.name}.log"

    def _server_cmd(self, *args: str) -> list[str]:
        user = server_user()
        prefix = ["runuser", "-u", user, "--"] if user else []
        return [*prefix, *args]

    def _run(self, cmd: list[str], what: str, timeout: float = 120) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ClusterError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        return proc.stdout

    def initdb(self, *, extra_conf: str = "", checksums: bool = True) -> None:
        """Create the cluster with settings a physical backup needs (replication, WAL senders); without
        `checksums`, as initdb makes one by default (hint bits then write no WAL)."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.datadir, 0o700)
        hand_over(self.datadir)
        self._run(
            self._server_cmd(
                str(self.pg_bin / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                *(["--data-checksums"] if checksums else []),
            ),
            "initdb",
        )
        conf = (
            f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
            "unix_socket_directories = ''\n"
            "wal_level = replica\nmax_wal_senders = 8\nfsync = on\n"
            "shared_buffers = 128MB\nmax_wal_size = 2GB\n" + extra_conf
        )
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write(conf)
        with open(self.datadir / "pg_hba.conf", "w") as f:
            f.write(
                "local all all trust\nlocal replication all trust\n"
                "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
            )
        hand_over(self.datadir)

    def is_running(self) -> bool:
        if not self.tcp and self.socket_dir is None:
            return False
        proc = subprocess.run(
            [str(self.pg_bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "2"],
            capture_output=True,
        )
        return proc.returncode == 0 and (self.datadir / "postmaster.pid").exists()

    def start(self, timeout: float = 120) -> None:
        if self.is_running():
            return
        log_file = self.log_file
        log_file.touch()
        log_file.chmod(0o600)  # kept after a failure; what the server logs is no one else's business
        hand_over(log_file)
        # Command-line settings win over the copied config of a restored cluster (pg_ctl hands them
        # to a shell: quoted), and the access rules are the data directory's own, never a file of the
        # source's elsewhere (see restore's pg_hba.conf).
        hba = shlex.quote(str(self.datadir / "pg_hba.conf"))
        ident = shlex.quote(str(self.datadir / "pg_ident.conf"))
        if self.tcp:
            listen = "-c listen_addresses=127.0.0.1 -c unix_socket_directories="
        else:
            socket_dir = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX))  # 0700, and short (108 bytes)
            hand_over(socket_dir)
            listen = (
                f"-c listen_addresses= -c unix_socket_directories={shlex.quote(str(socket_dir))} "
                "-c unix_socket_permissions=0700"
            )
        try:
            self._run(
                self._server_cmd(
                    str(self.pg_bin / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(log_file),
                    "-o",
                    f"-p {self.port} {listen} -c hba_file={hba} -c ident_file={ident}",
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ),
                f"starting PostgreSQL in {self.datadir}",
                timeout=timeout + 10,
            )
        except ClusterError as e:
            # pg_ctl only says "could not start server": the log says why.
            raise ClusterError(f"{e}\n{log_report(log_file)}") from e

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        socket_dir = self.socket_dir
        pg_ctl = [str(self.pg_bin / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]
        try:
            self._run(self._server_cmd(*pg_ctl), f"stopping PostgreSQL in {self.datadir}")
        except ClusterError:
            # A server can end on its own between the check above and pg_ctl (a FATAL in recovery), or
            # have died leaving its PID file: either way it is stopped, which is what was asked.
            if self._postmaster_alive():
                raise
        _remove_own_socket_dir(socket_dir)

    def _postmaster_pid(self) -> int | None:
        """The PID postmaster.pid names (None: no file, or none in it)."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _postmaster_alive(self) -> bool:
        """Whether the process postmaster.pid names still runs (False: no file, or a stale one)."""
        pid = self._postmaster_pid()
        return pid is not None and process_exists(pid)

    def destroy(self, timeout: float = 60) -> None:
        """Stop the server at once and remove its folder. An immediate stop is SIGQUIT to the
        postmaster; it is sent here and its end watched closely, since pg_ctl looks only every tenth of
        a second, a wait every scratch copy (a tenant restore, an export) would pay. Its end is its PID
        file gone, as pg_ctl judges it: the process itself may linger as a zombie until init reaps it."""
        pid = self._postmaster_pid()
        if pid is not None and pid > 0 and process_exists(pid):
            socket_dir = self.socket_dir
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + timeout
            pid_file = self.datadir / "postmaster.pid"
            while pid_file.exists() and process_exists(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            _remove_own_socket_dir(socket_dir)
        self.stop("immediate")  # what is left, if anything: pg_ctl says why it could not
        shutil.rmtree(self.datadir, ignore_errors=True)

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 600) -> str:
        """Run SQL through psql (unaligned, tuples only) and return its output."""
        return self._run(
            [
                str(self.pg_bin / "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                dbname,
                "-c",
                sql,
            ],
            f"psql on port {self.port} ({dbname})",
            timeout=timeout,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise ClusterError(f"PostgreSQL on port {self.port} did not become ready in {timeout:.0f}s")
            time.sleep(0.2)
