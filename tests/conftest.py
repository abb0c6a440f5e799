"""Shared fixtures: the real server in a subprocess, a real SMTP sink, a Mailgun stand-in."""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
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
from aiosmtpd.smtp import AuthResult, LoginPassword
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailsvc.v1 import mail_pb2_grpc, settings_pb2, settings_pb2_grpc

JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
SMTP_LOGIN = "mailer"
SMTP_PASSWORD = "smtp-pass-S3cret!"
MAILGUN_KEY = "key-mailgun-S3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
) -> Server:
    """Start the server as a user would and wait until health says SERVING."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSVC_")}
    full_env["MAILSVC_JWT_SECRET"] = JWT_SECRET
    full_env.update(env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"server-{port}.log"
    command = [sys.executable, "-m", "mailsvc", "serve", "--listen", address]
    command += ["--data-dir", str(data_dir), *args]
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = Server(address, data_dir, proc, log_path)
    if wait:
        wait_serving(server)
    return server


def wait_serving(server: Server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited {server.proc.returncode}:\n{server.logs()}")
        try:
            reply = server.health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
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
    """Collects every mail; `reply` may answer DATA with a chosen SMTP reply instead."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.data_replies: list[str] = []  # consumed one per DATA; empty = "250 OK"
        self.connections = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            if self.data_replies:
                return self.data_replies.pop(0)
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
        return "250 OK"


@dataclass
class SmtpSink:
    host: str
    port: int
    handler: SinkHandler
    controller: Controller

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received


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


@pytest.fixture(scope="session")
def server_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    cert = tls_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture
def smtp_factory(server_ssl_context: ssl.SSLContext) -> Iterator[Callable[..., SmtpSink]]:
    """Start SMTP sinks: mode "plain", "starttls" or "implicit"; auth=True requires AUTH."""
    sinks: list[SmtpSink] = []

    def factory(mode: str = "plain", *, auth: bool = False) -> SmtpSink:
        handler = SinkHandler()
        port = free_port()
        kwargs: dict[str, Any] = {}
        if mode == "starttls":
            kwargs["tls_context"] = server_ssl_context
        elif mode == "implicit":
            kwargs["ssl_context"] = server_ssl_context
        if auth:
            kwargs.update(authenticator=_authenticator, auth_required=True, auth_require_tls=False)
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        sink = SmtpSink("127.0.0.1", port, handler, controller)
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        sink.controller.stop()


@pytest.fixture
def smtp_sink(smtp_factory: Callable[..., SmtpSink]) -> SmtpSink:
    return smtp_factory()


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
