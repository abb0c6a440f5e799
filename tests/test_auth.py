"""End-to-end tests of who may call what: tokens, roles, SendMail rights, open endpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    JWT_SECRET,
    SUPERADMIN,
    USER,
    Server,
    SmtpSink,
    auth,
    details,
    make_token,
    smtp_settings,
)
from tests.helpers import Metadata, expect_error, get_settings

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
MISSING = {"TOKEN_MISSING"}
INVALID = {"TOKEN_INVALID"}
MISSING_OR_INVALID = {"TOKEN_MISSING", "TOKEN_INVALID"}


def send(server: Server, metadata: Metadata, to: str = "a@example.com") -> Any:
    request = mail_pb2.SendMailRequest(to=[to], subject="hi", text="hello")
    return server.mail.SendMail(request, metadata=metadata, timeout=20)


def update_settings(server: Server, metadata: Metadata) -> Any:
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(default_from="intruder@example.com")
    )
    return server.settings.UpdateMailSettings(request, metadata=metadata, timeout=10)


def delete_settings(server: Server, metadata: Metadata) -> Any:
    return server.settings.DeleteMailSettings(
        settings_pb2.DeleteMailSettingsRequest(), metadata=metadata, timeout=10
    )


def get_acl(server: Server, metadata: Metadata) -> Any:
    return server.settings.GetSettingsAcl(
        settings_pb2.GetSettingsAclRequest(), metadata=metadata, timeout=10
    )


def update_acl(server: Server, metadata: Metadata) -> Any:
    request = settings_pb2.UpdateSettingsAclRequest(
        acl=settings_pb2.SettingsAcl(read_roles=["user"], update_roles=["user"])
    )
    return server.settings.UpdateSettingsAcl(request, metadata=metadata, timeout=10)


def configure_sink(server: Server, sink: SmtpSink, **fields: Any) -> None:
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(sink), **fields))


def assert_nothing_sent(sink: SmtpSink) -> None:
    # No wait: a refused call ends before the servicer runs, and a send ends within its call.
    assert sink.received == []


# Every bad token claims superadmin, so a server that let it through would act on it.
BAD_CREDENTIALS = [
    pytest.param([], MISSING, id="no-metadata"),
    pytest.param([("authorization", "Bearer garbage")], INVALID, id="bearer-garbage"),
    pytest.param(
        auth(make_token(["superadmin"], secret="another-secret-0123456789abcdef0123")),
        INVALID,
        id="wrong-secret",
    ),
    pytest.param(
        auth(make_token(["superadmin"], exp=int(time.time()) - 3600)),
        {"TOKEN_EXPIRED"},
        id="expired",
    ),
    pytest.param(
        [("authorization", make_token(["superadmin"]))], MISSING_OR_INVALID, id="no-bearer-prefix"
    ),
    pytest.param([("authorization", "Basic cm9vdDpyb290")], MISSING_OR_INVALID, id="basic-scheme"),
    pytest.param(
        auth(jwt.encode({"sub": "root", "roles": "superadmin"}, JWT_SECRET, algorithm="HS256")),
        INVALID,
        id="roles-not-a-list",
    ),
    pytest.param(
        auth(jwt.encode({"sub": "root", "roles": ["superadmin"]}, "", algorithm="none")),
        INVALID,
        id="alg-none",
    ),
]


@pytest.mark.parametrize(("metadata", "reasons"), BAD_CREDENTIALS)
def test_bad_credentials_are_unauthenticated_without_side_effect(
    server: Server, smtp_sink: SmtpSink, metadata: Metadata, reasons: set[str]
) -> None:
    configure_sink(server, smtp_sink)
    settings_file = server.data_dir / "settings.json"
    before = settings_file.read_bytes()
    acl_before = get_acl(server, SUPERADMIN)

    for call in (send, get_settings, update_settings, delete_settings, get_acl, update_acl):
        err = expect_error(UNAUTHENTICATED, call, server, metadata)
        assert details(err)["reason"] in reasons, (call.__name__, details(err))

    assert_nothing_sent(smtp_sink)
    assert settings_file.read_bytes() == before
    assert get_acl(server, SUPERADMIN) == acl_before


def test_unexpired_token_is_accepted(server: Server) -> None:
    server.put_settings(settings_pb2.MailSettings(default_from="owner@example.com"))
    metadata = auth(make_token(["superadmin"], exp=int(time.time()) + 600))
    # Accepted: the caller gets the settings, just as with a token without `exp`.
    assert get_settings(server, metadata) == get_settings(server, SUPERADMIN)


@pytest.mark.parametrize(
    "call",
    [get_settings, update_settings, delete_settings, get_acl, update_acl],
    ids=lambda c: c.__name__,
)
def test_settings_rpcs_without_role_are_denied(
    server: Server, call: Callable[[Server, Metadata], Any]
) -> None:
    server.put_settings(settings_pb2.MailSettings(default_from="owner@example.com"))
    settings_file = server.data_dir / "settings.json"
    before = settings_file.read_bytes()
    acl_before = get_acl(server, SUPERADMIN)
    err = expect_error(DENIED, call, server, USER)
    assert details(err)["reason"] == "ROLE_MISSING"
    assert settings_file.read_bytes() == before
    assert get_acl(server, SUPERADMIN) == acl_before


def test_send_mail_without_role_is_denied_and_nothing_sent(
    server: Server, smtp_sink: SmtpSink
) -> None:
    configure_sink(server, smtp_sink)
    err = expect_error(DENIED, send, server, USER)
    assert details(err)["reason"] == "ROLE_MISSING"
    assert_nothing_sent(smtp_sink)


def test_send_mail_role_outside_authorized_roles_is_denied(
    server: Server, smtp_sink: SmtpSink
) -> None:
    configure_sink(server, smtp_sink, authorized_roles=["mailer"])
    err = expect_error(DENIED, send, server, auth(make_token(["reporter"], sub="rep")))
    assert details(err)["reason"] == "ROLE_MISSING"
    assert_nothing_sent(smtp_sink)


@pytest.mark.parametrize(
    ("metadata", "fields"),
    [
        pytest.param(ADMIN, {}, id="admin"),
        pytest.param(SUPERADMIN, {}, id="superadmin"),
        pytest.param(USER, {"enable_user_full_access": True}, id="user-full-access"),
        pytest.param(
            auth(make_token(["mailer"], sub="robot")),
            {"authorized_roles": ["mailer"]},
            id="authorized-role",
        ),
        pytest.param(USER, {"authorized_roles": ["user"]}, id="implicit-user-role-authorized"),
    ],
)
def test_send_mail_allowed(
    server: Server, smtp_sink: SmtpSink, metadata: Metadata, fields: dict[str, Any]
) -> None:
    configure_sink(server, smtp_sink, **fields)
    reply = send(server, metadata, to="allowed@example.com")
    assert reply.transport == "smtp"
    received = smtp_sink.wait_for(1)
    assert len(received) == 1
    assert received[0].rcpt_tos == ["allowed@example.com"]


def test_health_works_without_token(server: Server) -> None:
    for service in ("", "mailsvc.v1.MailService", "mailsvc.v1.SettingsService"):
        reply = server.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_works_without_token(server: Server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = [
        service.name
        for response in stub.ServerReflectionInfo(iter([request]), timeout=10)
        for service in response.list_services_response.service
    ]
    assert "mailsvc.v1.MailService" in names
    assert "mailsvc.v1.SettingsService" in names
