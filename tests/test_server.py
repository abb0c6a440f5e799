"""End-to-end tests of the server process: health, reflection, signals, env, grpcurl, --dev."""

from __future__ import annotations

import email
import email.policy
import json
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    JWT_SECRET,
    SUPERADMIN,
    Server,
    SmtpSink,
    auth,
    make_token,
    smtp_settings,
)
from tests.helpers import JWT_RE, ServerFactory, grpcurl

SERVICES = ("mailsvc.v1.MailService", "mailsvc.v1.SettingsService")


def list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return [
        service.name
        for response in stub.ServerReflectionInfo(iter([request]), timeout=10)
        for service in response.list_services_response.service
    ]


def send(server: Server, metadata: list[tuple[str, str]], **fields: Any) -> Any:
    request = mail_pb2.SendMailRequest(**fields)
    return server.mail.SendMail(request, metadata=metadata, timeout=20)


def bare_id(message_id: str) -> str:
    return message_id.strip().strip("<>")


# --- health and reflection -------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", *SERVICES])
def test_health_serving(server: Server, service: str) -> None:
    reply = server.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_unknown_service_is_not_found(server: Server) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_both_services(server: Server) -> None:
    names = list_services(server.channel)
    for service in SERVICES:
        assert service in names


def test_reflection_describes_the_mail_service(server: Server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="mailsvc.v1.MailService"
    )
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert len(responses) == 1
    protos = responses[0].file_descriptor_response.file_descriptor_proto
    assert protos, responses[0]


# --- signals ---------------------------------------------------------------------------------


def test_sigterm_exits_zero_promptly(server: Server) -> None:
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - started < 10


# --- environment twins -----------------------------------------------------------------------


def test_env_twins_replace_the_flags(
    tmp_path: Path, server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    data_dir = tmp_path / "env-data"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # via_env: the address and data dir go in as MAILSVC_LISTEN and MAILSVC_DATA_DIR.
    server = server_factory(
        data_dir=data_dir,
        env={"MAILSVC_DEFAULT_FROM": "env-from@example.com"},
        via_env=True,
        cwd=cwd,
    )
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    assert (data_dir / "settings.json").is_file()
    assert not (tmp_path / "cwd" / "data").exists()

    reply = send(server, SUPERADMIN, to=["a@example.com"], subject="env", text="x")
    assert reply.transport == "smtp"
    received = smtp_sink.wait_for(1)
    assert len(received) == 1
    assert received[0].mail_from == "env-from@example.com"
    assert "env-from@example.com" in str(received[0].message["From"])


# --- grpcurl through reflection --------------------------------------------------------------


def test_grpcurl_lists_and_describes(server: Server) -> None:
    listed = grpcurl("-plaintext", server.address, "list")
    assert listed.returncode == 0, listed.stderr
    for service in SERVICES:
        assert service in listed.stdout.split()

    described = grpcurl("-plaintext", server.address, "describe", "mailsvc.v1.MailService")
    assert described.returncode == 0, described.stderr
    assert "SendMail" in described.stdout
    assert "SendTemplatedMail" in described.stdout
    assert "RenderTemplate" in described.stdout

    message = grpcurl("-plaintext", server.address, "describe", "mailsvc.v1.MailSettings")
    assert message.returncode == 0, message.stderr
    assert "etag" in message.stdout


def test_grpcurl_send_mail(server: Server, smtp_sink: SmtpSink) -> None:
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    token = make_token(["admin"], sub="grpcurl")
    body = json.dumps({"to": ["a@example.com"], "subject": "hi", "text": "x"})
    result = grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        body,
        server.address,
        "mailsvc.v1.MailService/SendMail",
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    # grpcurl names fields by the descriptor's json_name, or by the proto name without one.
    message_id = reply.get("messageId") or reply.get("message_id")
    assert message_id, result.stdout
    assert reply["transport"] == "smtp"
    received = smtp_sink.wait_for(1)
    assert len(received) == 1
    assert received[0].rcpt_tos == ["a@example.com"]
    message = received[0].message
    assert message["Subject"] == "hi"
    assert bare_id(str(message["Message-ID"])) == bare_id(message_id)


def test_grpcurl_without_token_is_unauthenticated(server: Server, smtp_sink: SmtpSink) -> None:
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    body = json.dumps({"to": ["a@example.com"], "subject": "hi", "text": "x"})
    result = grpcurl("-plaintext", "-d", body, server.address, "mailsvc.v1.MailService/SendMail")
    assert result.returncode != 0
    assert "Unauthenticated" in result.stdout + result.stderr
    # No wait: a refused call ends before the servicer runs.
    assert smtp_sink.received == []


# --- --dev -----------------------------------------------------------------------------------


def wait_for_token(server: Server, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for candidate in JWT_RE.findall(server.logs()):
            try:
                jwt.decode(candidate, JWT_SECRET, algorithms=["HS256"])
            except jwt.PyJWTError:
                continue
            return str(candidate)
        time.sleep(0.1)
    raise AssertionError(f"no token signed with the server's secret in the log:\n{server.logs()}")


@pytest.mark.parametrize(
    ("args", "env"),
    [pytest.param(["--dev"], {}, id="flag"), pytest.param([], {"MAILSVC_DEV": "1"}, id="env")],
)
def test_dev_mode_prints_token_and_writes_outbox(
    server_factory: ServerFactory, args: list[str], env: dict[str, str]
) -> None:
    server = server_factory(*args, env=env)
    token = wait_for_token(server)
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert "superadmin" in claims["roles"]

    server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=auth(token), timeout=10
    )
    reply = send(server, auth(token), to=["a@example.com"], subject="dev mail", text="hello")
    assert reply.transport == "maildir"
    assert list(reply.recipients) == ["a@example.com"]
    files = list((server.data_dir / "outbox").glob("*.eml"))
    assert len(files) == 1
    message = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "dev mail"
    assert "a@example.com" in str(message["To"])
    assert "no-reply@localhost" in str(message["From"])
    assert bare_id(str(message["Message-ID"])) == bare_id(reply.message_id)


def test_without_dev_and_transport_send_fails_precondition(server: Server) -> None:
    with pytest.raises(grpc.RpcError) as info:
        send(server, SUPERADMIN, to=["a@example.com"], subject="s", text="t")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    outbox = server.data_dir / "outbox"
    assert not outbox.exists() or not any(outbox.iterdir())
