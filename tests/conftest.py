"""Shared fixtures: the real server in a subprocess, a real SMTP sink, a Mailgun stand-in."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailsvc.v1 import mail_pb2_grpc, settings_pb2, settings_pb2_grpc

from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage

JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
SMTP_LOGIN = "mailer"
SMTP_PASSWORD = "smtp-pass-S3cret!"
MAILGUN_KEY = "key-mailgun-S3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout: float = 10, what: str = "condition"
) -> None:
    """Poll `predicate` until it is true; fail the test when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout}s")
        time.sleep(0.02)


def make_token(
    roles: list[str],
    sub: str = "tester",
    *,
    exp: int | None = None,
    secret: str = JWT_SECRET,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"sub": sub, "roles": roles, **claims}
    if exp is not None:
        payload["exp"] = exp
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(token: str) -> list[tuple[str, str]]:
    """Call metadata carrying a bearer token."""
    return [("authorization", f"Bearer {token}")]


SUPERADMIN = auth(make_token(["superadmin"], sub="root"))
ADMIN = auth(make_token(["admin"], sub="ops"))
USER = auth(make_token([], sub="someone"))


@dataclass
class Server:
    """A running `python -m mailsvc serve` process."""

    address: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.settings = settings_pb2_grpc.SettingsServiceStub(self.channel)
        self.mail = mail_pb2_grpc.MailServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def put_settings(self, settings: settings_pb2.MailSettings) -> settings_pb2.MailSettings:
        """Replace all settings as superadmin."""
        request = settings_pb2.UpdateMailSettingsRequest(settings=settings)
        reply: settings_pb2.MailSettings = self.settings.UpdateMailSettings(
            request, metadata=SUPERADMIN, timeout=10
        )
        return reply

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait: bool = True,
    jwt_secret: str | None = JWT_SECRET,
    via_env: bool = False,
    cwd: Path | None = None,
) -> Server:
    """Start the server as a user would and wait until health says SERVING.

    The child gets this process's environment without MAILSVC_ variables, then
    MAILSVC_JWT_SECRET (unless `jwt_secret` is None), then `env`. The address and `data_dir`
    go in as --listen/--data-dir, or as MAILSVC_LISTEN/MAILSVC_DATA_DIR when `via_env`.
    """
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSVC_")}
    if jwt_secret is not None:
        full_env["MAILSVC_JWT_SECRET"] = jwt_secret
    command = [sys.executable, "-m", "mailsvc", "serve"]
    if via_env:
        full_env.update(MAILSVC_LISTEN=address, MAILSVC_DATA_DIR=str(data_dir))
    else:
        command += ["--listen", address, "--data-dir", str(data_dir)]
    command += args
    full_env.update(env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )
    server = Server(address, data_dir, proc, log_path)
    if wait:
        wait_serving(server)
    return server


def serving(server: Server) -> bool:
    """Whether health says SERVING now (False while starting, draining or gone)."""
    try:
        reply = server.health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_serving(server: Server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited {server.proc.returncode}:\n{server.logs()}")
        if serving(server):
            return
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become SERVING:\n{server.logs()}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers (several, or restarts) in this test's directory; all are stopped after."""
    started: list[Server] = []

    def factory(*args: str, data_dir: Path | None = None, **kwargs: Any) -> Server:
        server = start_server(data_dir or tmp_path / "data", *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    """A server with default flags and an empty data dir."""
    return server_factory()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with default flags for a whole module; each test stores its own settings."""
    server = start_server(tmp_path_factory.mktemp("shared") / "data")
    yield server
    server.stop(signal.SIGKILL)


# --- SMTP sink -------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class SinkHandler:
    """Collects every mail it accepts and counts DATA commands.

    `data_replies` answers the next DATA commands (one each) with chosen SMTP replies,
    `always` answers every DATA with one reply, `delay` makes each DATA slow.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received: list[Received] = []
        self.data_replies: list[str] = []  # consumed one per DATA; empty = "250 OK"
        self.always: str | None = None  # answer every DATA with this, accept nothing
        self.data_commands = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.data_commands += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            if self.always is not None:
                return self.always
            if self.data_replies:
                return self.data_replies.pop(0)
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
        return "250 OK"


class ConnectionCounter:
    """Connections the sink has seen: opened in all, open now, most open at once."""

    def __init__(self) -> None:
        self.armed = False  # the controller's own start-up probe is not counted
        self.opened = 0
        self.open_now = 0
        self.max_open = 0
        self.lock = threading.Lock()


class CountingSMTP(SMTP):  # type: ignore[misc]
    def __init__(self, handler: Any, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counter = counter
        self._counted = counter.armed

    def connection_made(self, transport: Any) -> None:
        if self._counted:
            c = self._counter
            with c.lock:
                c.opened += 1
                c.open_now += 1
                c.max_open = max(c.max_open, c.open_now)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            with self._counter.lock:
                self._counter.open_now -= 1
        super().connection_lost(error)


class CountingController(Controller):  # type: ignore[misc]
    def __init__(self, handler: Any, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.counter = counter

    def factory(self) -> CountingSMTP:
        return CountingSMTP(self.handler, self.counter, **self.SMTP_kwargs)


@dataclass
class SmtpSink:
    host: str
    port: int
    handler: SinkHandler
    controller: Controller
    counter: ConnectionCounter = field(default_factory=ConnectionCounter)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        """The mails received, once there are `count` (or `timeout` passed: callers assert)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def wait_data(self, count: int, timeout: float = 10) -> None:
        """Wait until the sink has seen `count` DATA commands (accepted or not)."""
        wait_until(lambda: self.handler.data_commands >= count, timeout, "DATA commands")

    def expect_no_more(self, within: float) -> None:
        """Fail as soon as a mail beyond those received now arrives in the next `within` s.

        Only for work that may outlive its RPC (a caller that gave up, a deadline): a mail a
        finished call caused has reached the sink before the call returned.
        """
        count = len(self.received)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert len(self.received) == count, f"{len(self.received) - count} more mail(s)"
            time.sleep(0.02)
        assert len(self.received) == count, f"{len(self.received) - count} more mail(s)"

    def stop(self) -> None:
        self.controller.stop()


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, data: Any
) -> AuthResult:
    ok = (
        isinstance(data, LoginPassword)
        and data.login.decode() == SMTP_LOGIN
        and data.password.decode() == SMTP_PASSWORD
    )
    # handled=False: aiosmtpd itself answers 535 to a refused login.
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA as a PEM file: pass it to the server as SSL_CERT_FILE."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@dataclass(frozen=True)
class Pki:
    """PEM files signed by the test CA: a server certificate for 127.0.0.1 and mail.internal
    (not localhost), and a client certificate."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_flags(self) -> list[str]:
        """`mailsvc serve` flags for TLS with this certificate."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def client_flags(self) -> list[str]:
        """Client command flags: trust the CA and present the client certificate."""
        trust = ["--tls-ca", str(self.ca)]
        return [*trust, "--tls-cert", str(self.client_cert), "--tls-key", str(self.client_key)]


@pytest.fixture(scope="session")
def pki(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    files = Pki(
        base / "ca.pem",
        base / "server.pem",
        base / "server.key",
        base / "client.pem",
        base / "client.key",
    )
    server_cert = tls_ca.issue_cert("127.0.0.1", "mail.internal")
    client_cert = tls_ca.issue_cert("operator.example.com")
    tls_ca.cert_pem.write_to_path(str(files.ca))
    server_cert.cert_chain_pems[0].write_to_path(str(files.cert))
    server_cert.private_key_pem.write_to_path(str(files.key))
    client_cert.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client_cert.private_key_pem.write_to_path(str(files.client_key))
    return files


@pytest.fixture(scope="session")
def server_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    cert = tls_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def start_sink(
    mode: str = "plain",
    *,
    auth: bool = False,
    delay: float = 0.0,
    ssl_context: ssl.SSLContext | None = None,
) -> SmtpSink:
    """Start an SMTP sink on 127.0.0.1 (see smtp_factory); the caller stops it."""
    handler = SinkHandler(delay)
    counter = ConnectionCounter()
    port = free_port()
    kwargs: dict[str, Any] = {}
    if mode == "starttls":
        kwargs["tls_context"] = ssl_context
    elif mode == "implicit":
        kwargs["ssl_context"] = ssl_context
    if auth:
        kwargs.update(authenticator=_authenticator, auth_required=True, auth_require_tls=False)
    controller = CountingController(handler, counter, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    counter.armed = True
    return SmtpSink("127.0.0.1", port, handler, controller, counter)


@pytest.fixture
def smtp_factory(server_ssl_context: ssl.SSLContext) -> Iterator[Callable[..., SmtpSink]]:
    """Start SMTP sinks: mode "plain", "starttls" or "implicit"; auth=True requires AUTH;
    delay (seconds) makes every DATA slow."""
    sinks: list[SmtpSink] = []

    def factory(mode: str = "plain", *, auth: bool = False, delay: float = 0.0) -> SmtpSink:
        sink = start_sink(mode, auth=auth, delay=delay, ssl_context=server_ssl_context)
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        sink.stop()


@pytest.fixture
def smtp_sink(smtp_factory: Callable[..., SmtpSink]) -> SmtpSink:
    return smtp_factory()


@pytest.fixture(scope="module")
def shared_sink() -> Iterator[SmtpSink]:
    """One plain SMTP sink for a whole module (mails of earlier tests stay in it)."""
    sink = start_sink()
    yield sink
    sink.stop()


# --- Mailgun stand-in ------------------------------------------------------------------------


@dataclass
class MailgunRequest:
    path: str
    authorization: str
    fields: list[tuple[str, str]]
    files: list[tuple[str, str, str, bytes]]  # (field name, filename, content type, bytes)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.fields if k == name]


class MailgunStandIn:
    """An HTTP server answering like Mailgun's POST /v3/{domain}/messages."""

    def __init__(self) -> None:
        self.requests: list[MailgunRequest] = []
        self.statuses: list[int] = []  # consumed one per request; empty = 200
        self.always: int | None = None  # answer every request with this status
        self.hang_up = False  # read the request, then close the connection without a reply
        self.key = MAILGUN_KEY
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                stand_in.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        import base64

        expected = "Basic " + base64.b64encode(f"api:{self.key}".encode()).decode()
        authorization = h.headers.get("Authorization", "")
        fields, files = parse_form(h.headers.get("Content-Type", ""), body)
        self.requests.append(MailgunRequest(h.path, authorization, fields, files))
        if self.hang_up:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        status = self.always or (self.statuses.pop(0) if self.statuses else 200)
        if authorization != expected:
            status = 401
        if status == 200:
            n = len(self.requests)
            payload = {"id": f"<mg-{n}@mailgun.test>", "message": "Queued. Thank you."}
        else:
            payload = {"message": f"stand-in says {status}"}
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def parse_form(
    content_type: str, body: bytes
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str, bytes]]]:
    """Parse multipart/form-data or urlencoded bodies into fields and files."""
    from urllib.parse import parse_qsl

    if content_type.startswith("application/x-www-form-urlencoded"):
        return parse_qsl(body.decode(), keep_blank_values=True), []
    msg = email.message_from_bytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
        policy=email.policy.HTTP,
    )
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, str, str, bytes]] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if filename is not None:
            files.append((str(name), filename, part.get_content_type(), payload))
        else:
            fields.append((str(name), payload.decode()))
    return fields, files


@pytest.fixture
def mailgun() -> Iterator[MailgunStandIn]:
    stand_in = MailgunStandIn()
    yield stand_in
    stand_in.close()


def smtp_settings(sink: SmtpSink, **kwargs: Any) -> settings_pb2.SmtpSettings:
    return settings_pb2.SmtpSettings(host=sink.host, port=sink.port, **kwargs)


def details(err: grpc.RpcError) -> dict[str, Any]:
    """Decode google.rpc.Status details: {"reason": ..., "violations": {field: description}}."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    out: dict[str, Any] = {"reason": None, "violations": {}}
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["domain"] = info.domain
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                out["violations"][v.field] = v.description
    return out


# --- PostgreSQL (tests/pg.py): one server per test session, a fresh database per test.
from tests import pg as _pg  # noqa: E402


@pytest.fixture(scope="session")
def pg_server() -> Iterator[_pg.PgServer]:
    server = _pg.start_session_server()
    yield server
    _pg.remove(server)


@pytest.fixture
def pg_url(pg_server: _pg.PgServer) -> Iterator[str]:
    """A fresh empty database on the session's PostgreSQL (dropped after the test)."""
    url = pg_server.create_database()
    yield url
    if pg_server.running:
        pg_server.psql(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture
def own_server() -> Iterator[_pg.PgServer]:
    """A PostgreSQL server of this test's own, which it may stop and start."""
    server = _pg.start_session_server()
    yield server
    _pg.remove(server)


@pytest.fixture
def anyio_backend() -> str:
    """The async tests (pytest.mark.anyio) run on asyncio, as the server does."""
    return "asyncio"


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    """An open embedded store in a fresh directory (test_storage.py runs both stores)."""
    store = SqliteStorage(tmp_path / FILE_NAME)
    await store.open()
    yield store
    await store.aclose()


# --- DKIM keys (tests/keys.py): generated once per test module.
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

from tests import keys as _keys  # noqa: E402


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return _keys.pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ed25519_pem() -> str:
    return _keys.pem(ed25519.Ed25519PrivateKey.generate())
