"""Rate limits end to end: the exact count, per caller, per role, batches whole, restarts."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_status import rpc_status
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import SUPERADMIN, Server, SmtpSink, auth, details, make_token, smtp_settings
from tests.helpers import assert_error, expect_error, send, struct

ServerFactory = Callable[..., Server]
ALICE = auth(make_token([], sub="alice"))
BOB = auth(make_token([], sub="bob"))
VIP = auth(make_token(["vip"], sub="vera"))


def limited(
    server_factory: ServerFactory, sink: SmtpSink, *rules: settings_pb2.RateLimit
) -> Server:
    server = server_factory()
    template = settings_pb2.MailTemplate(
        to=["t@example.com"], subject="s", text="t", roles=["user"]
    )
    server.put_settings(
        settings_pb2.MailSettings(
            smtp=smtp_settings(sink),
            enable_user_full_access=True,
            rate_limits=list(rules),
            templates={"t": template},
        )
    )
    return server


def mail(**fields: Any) -> mail_pb2.SendMailRequest:
    return mail_pb2.SendMailRequest(to=["r@example.com"], subject="s", text="t", **fields)


def refused(server: Server, metadata: Any, reason: str, **fields: Any) -> grpc.RpcError:
    err = expect_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, send, server, mail(**fields), metadata=metadata
    )
    assert_error(err, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
    return err


def test_the_limit_is_hit_at_exactly_the_count_per_caller(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = limited(server_factory, smtp_sink, settings_pb2.RateLimit(role="user", per_minute=3))
    for _ in range(3):
        send(server, mail(), metadata=ALICE)
    err = refused(server, ALICE, "RATE_LIMITED")
    status = rpc_status.from_call(err)
    assert status is not None
    kinds = {d.TypeName() for d in status.details}
    assert {"google.rpc.RetryInfo", "google.rpc.QuotaFailure"} <= kinds
    refused(server, ALICE, "RATE_LIMITED", queue=True)  # queued sends count the same
    for _ in range(3):
        send(server, mail(), metadata=BOB)  # another caller has a count of its own
    send(server, mail(), metadata=SUPERADMIN)  # never limited
    assert len(smtp_sink.wait_for(7)) == 7


def test_the_most_generous_rule_of_the_callers_roles_applies(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = limited(
        server_factory,
        smtp_sink,
        settings_pb2.RateLimit(role="user", per_minute=1),
        settings_pb2.RateLimit(role="vip", per_minute=4),
    )
    for _ in range(4):
        send(server, mail(), metadata=VIP)
    refused(server, VIP, "RATE_LIMITED")
    send(server, mail(), metadata=ALICE)
    refused(server, ALICE, "RATE_LIMITED")


def test_a_batch_that_does_not_fit_is_refused_whole(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = limited(server_factory, smtp_sink, settings_pb2.RateLimit(role="user", per_minute=3))

    def batch(n: int) -> Any:
        return server.mail.SendMailBatch(
            mail_pb2.SendMailBatchRequest(
                template_name="t", entries=[mail_pb2.BatchEntry(parameters=struct({}))] * n
            ),
            metadata=ALICE,
            timeout=10,
        )

    err = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, batch, 4)
    assert details(err)["reason"] == "RATE_LIMITED"
    listed = server.mail.ListMessages(mail_pb2.ListMessagesRequest(), metadata=ALICE, timeout=10)
    assert list(listed.messages) == []
    assert len(batch(3).results) == 3
    refused(server, ALICE, "RATE_LIMITED")


def test_the_daily_count_survives_a_restart(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = limited(server_factory, smtp_sink, settings_pb2.RateLimit(role="user", per_day=2))
    send(server, mail(), metadata=ALICE)
    send(server, mail(queue=True), metadata=ALICE)
    server.stop(signal.SIGTERM)
    again = server_factory(data_dir=server.data_dir)
    refused(again, ALICE, "DAILY_QUOTA_EXCEEDED")
    send(again, mail(), metadata=BOB)


def test_bad_rules_are_refused_naming_the_field(server_factory: ServerFactory) -> None:
    server = server_factory()
    bad = settings_pb2.MailSettings(
        rate_limits=[
            settings_pb2.RateLimit(role="user", per_minute=-1),
            settings_pb2.RateLimit(role="", per_day=5),
        ]
    )
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, server.put_settings, bad)
    violations = details(err)["violations"]
    assert {"settings.rate_limits[0].per_minute", "settings.rate_limits[1].role"} <= set(violations)
