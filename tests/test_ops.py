"""Operations: Prometheus metrics, JSON logs, TLS and mTLS, hot reload of settings.json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailsvc.v1 import mail_pb2, mail_pb2_grpc, settings_pb2, settings_pb2_grpc

from tests.conftest import (
    ADMIN,
    JWT_SECRET,
    MAILGUN_KEY,
    SMTP_PASSWORD,
    SUPERADMIN,
    MailgunStandIn,
    Pki,
    Server,
    SmtpSink,
    free_port,
    make_token,
    smtp_settings,
    wait_until,
)
from tests.helpers import ServerFactory, SmtpFactory, cli, get_settings, grpcurl, scrape


def mail(**kwargs: object) -> mail_pb2.SendMailRequest:
    fields: dict[str, object] = {"to": ["rcpt@example.com"], "subject": "hi", "text": "body"}
    fields.update(kwargs)
    return mail_pb2.SendMailRequest(**fields)  # type: ignore[arg-type]


def test_metrics_serve_the_named_series_and_move(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    port = free_port()
    server = server_factory("--metrics-listen", f"127.0.0.1:{port}")
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    before = scrape(port)
    send = 'mailsvc_rpc_requests_total{code="OK",method="mailsvc.v1.MailService/SendMail"}'
    sent = 'mailsvc_sends_total{outcome="ok",transport="smtp"}'
    assert before.get(send, 0) == 0
    assert "mailsvc_smtp_pool_connections_in_use" in before

    first = server.mail.SendMail(mail(idempotency_key="k1"), metadata=ADMIN, timeout=10)
    again = server.mail.SendMail(mail(idempotency_key="k1"), metadata=ADMIN, timeout=10)
    assert again.message_id == first.message_id
    smtp_sink.handler.data_replies.append("451 4.7.1 try later")
    server.mail.SendMail(mail(), metadata=ADMIN, timeout=10)

    after = scrape(port)
    assert after[send] == 3
    assert after[sent] == 2
    assert after['mailsvc_send_retries_total{transport="smtp"}'] == 1
    assert after["mailsvc_idempotent_replays_total"] == 1
    latency = 'mailsvc_rpc_duration_seconds_count{method="mailsvc.v1.MailService/SendMail"}'
    assert after[latency] == 3
    denied = (
        'mailsvc_rpc_requests_total{code="UNAUTHENTICATED",'
        'method="mailsvc.v1.MailService/SendMail"}'
    )
    with pytest.raises(grpc.RpcError):
        server.mail.SendMail(mail(), timeout=10)
    assert scrape(port)[denied] == 1


def test_failover_is_counted(server_factory: ServerFactory, mailgun: MailgunStandIn) -> None:
    port = free_port()
    server = server_factory(
        "--metrics-listen", f"127.0.0.1:{port}", "--mailgun-base-url", mailgun.base_url
    )
    server.put_settings(
        settings_pb2.MailSettings(
            smtp=settings_pb2.SmtpSettings(host="127.0.0.1", port=free_port()),
            mailgun=settings_pb2.MailgunSettings(domain="mg.example.com", key=MAILGUN_KEY),
        )
    )
    reply = server.mail.SendMail(mail(), metadata=ADMIN, timeout=10)
    assert reply.transport == "mailgun"
    samples = scrape(port)
    assert samples['mailsvc_failovers_total{from_transport="smtp",to_transport="mailgun"}'] == 1
    assert samples['mailsvc_sends_total{outcome="ok",transport="mailgun"}'] == 1


def test_json_logs_parse_and_hold_no_secret(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, mailgun: MailgunStandIn
) -> None:
    sink = smtp_factory(auth=True)
    server = server_factory("--log-format", "json", "--mailgun-base-url", mailgun.base_url)
    token = make_token(["admin"], sub="json-logger")
    settings = settings_pb2.MailSettings(
        smtp=smtp_settings(sink, login="mailer", password=SMTP_PASSWORD),
        mailgun=settings_pb2.MailgunSettings(domain="mg.example.com", key=MAILGUN_KEY),
    )
    server.put_settings(settings)
    server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN, timeout=10
    )
    reply = server.mail.SendMail(
        mail(), metadata=[("authorization", f"Bearer {token}")], timeout=10
    )
    bad = settings_pb2.MailSettings()
    bad.CopyFrom(settings)
    bad.smtp.password = "wrong-" + SMTP_PASSWORD
    server.put_settings(bad)
    with pytest.raises(grpc.RpcError):
        server.mail.SendMail(mail(), metadata=ADMIN, timeout=10)
    with pytest.raises(grpc.RpcError):
        server.mail.SendMail(mail(), metadata=[("authorization", "Bearer " + token + "x")])
    assert server.stop() == 0

    lines = [line for line in server.logs().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [r for r in records if r.get("method") == "mailsvc.v1.MailService/SendMail"]
    assert [r["code"] for r in access] == ["OK", "FAILED_PRECONDITION", "UNAUTHENTICATED"]
    assert access[0]["caller"] == "json-logger"
    assert access[0]["message_id"] == reply.message_id
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    text = server.logs()
    for secret in (SMTP_PASSWORD, MAILGUN_KEY, JWT_SECRET, token, SUPERADMIN[0][1][7:]):
        assert secret not in text


# --- TLS -------------------------------------------------------------------------------------


def tls_channel(address: str, pki: Pki, *, client_cert: bool) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address, credentials)


def tls_server(server_factory: ServerFactory, pki: Pki, *extra: str) -> Server:
    server = server_factory(*pki.server_flags(), *extra, wait=False)
    with tls_channel(server.address, pki, client_cert=True) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
    return server


def test_tls_serves_health_and_mail(
    server_factory: ServerFactory, pki: Pki, smtp_sink: SmtpSink
) -> None:
    server = tls_server(server_factory, pki)
    with tls_channel(server.address, pki, client_cert=False) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        settings = settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink))
        settings_pb2_grpc.SettingsServiceStub(channel).UpdateMailSettings(
            settings_pb2.UpdateMailSettingsRequest(settings=settings),
            metadata=SUPERADMIN,
            timeout=10,
        )
        mail_pb2_grpc.MailServiceStub(channel).SendMail(mail(), metadata=ADMIN, timeout=10)
    assert len(smtp_sink.wait_for(1)) == 1
    with pytest.raises(grpc.RpcError) as plain:
        server.health.Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_required_with_client_ca(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = tls_server(server_factory, pki, "--tls-client-ca", str(pki.ca))
    with tls_channel(server.address, pki, client_cert=True) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with (
        tls_channel(server.address, pki, client_cert=False) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_over_tls(server_factory: ServerFactory, pki: Pki) -> None:
    server = tls_server(server_factory, pki)
    listed = grpcurl("-cacert", str(pki.ca), server.address, "list", timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "mailsvc.v1.MailService" in listed.stdout.split()
    plain = grpcurl("-plaintext", server.address, "list", timeout=30)
    assert plain.returncode != 0


def serve_refused(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run `mailsvc serve` with flags that must stop it at start."""
    listen = ["--listen", f"127.0.0.1:{free_port()}"]
    env = {"PATH": os.environ["PATH"], "MAILSVC_JWT_SECRET": JWT_SECRET}
    return cli("serve", "--data-dir", str(data_dir), *listen, *flags, env=env, timeout=30)


def test_tls_flags_must_come_together(tmp_path: Path, pki: Pki) -> None:
    result = serve_refused(tmp_path, "--tls-cert", str(pki.cert))
    assert result.returncode == 2
    assert "--tls-key" in result.stderr


# --- hot reload ------------------------------------------------------------------------------


def write_settings(path: Path, settings: settings_pb2.MailSettings) -> None:
    tmp = path.with_suffix(".edit")
    tmp.write_text(json_format.MessageToJson(settings))
    tmp.replace(path)


def test_outside_edit_takes_effect_and_invalid_edit_is_ignored(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = server_factory("--reload-interval", "0.2")
    path = server.data_dir / "settings.json"
    before = get_settings(server)
    write_settings(
        path,
        settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink), default_from="ops@example.com"),
    )
    wait_until(lambda: get_settings(server).default_from == "ops@example.com")
    after = get_settings(server)
    assert after.smtp.host == smtp_sink.host
    assert after.etag != before.etag
    server.mail.SendMail(mail(), metadata=ADMIN, timeout=10)
    assert smtp_sink.wait_for(1)[0].message["From"] == "ops@example.com"

    broken = b'{"smtp": {"host": '
    path.write_bytes(broken)
    wait_until(lambda: "settings file edit ignored" in server.logs())
    assert get_settings(server).default_from == "ops@example.com"
    server.mail.SendMail(mail(), metadata=ADMIN, timeout=10)
    assert len(smtp_sink.wait_for(2)) == 2
    with pytest.raises(grpc.RpcError) as refused:
        server.put_settings(settings_pb2.MailSettings(default_from="x@example.com"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # No wait: a refused write ends before its call returns.
    assert path.read_bytes() == broken  # never overwritten

    invalid = settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(port=25))
    write_settings(path, invalid)  # parses, but smtp has no host
    wait_until(lambda: server.logs().count("settings file edit ignored") >= 2)
    assert get_settings(server).default_from == "ops@example.com"


def test_busy_metrics_port_stops_the_start_clearly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve_refused(tmp_path, "--metrics-listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
