"""SendMailBatch end to end: every entry checked before anything is stored, bounds, delivery."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import ADMIN, SUPERADMIN, Server, SmtpSink, details, smtp_settings
from tests.helpers import body, expect_error, struct, wait_until

ServerFactory = Callable[..., Server]
S = mail_pb2.MessageStatus


def batch_server(server_factory: ServerFactory, sink: SmtpSink) -> Server:
    server = server_factory()
    template = settings_pb2.MailTemplate(
        subject="Hello {{ name }}", text="Dear {{ name }}", model={"name": "string"}
    )
    server.put_settings(
        settings_pb2.MailSettings(smtp=smtp_settings(sink), templates={"greet": template})
    )
    return server


def batch(server: Server, entries: list[mail_pb2.BatchEntry], **fields: Any) -> Any:
    return server.mail.SendMailBatch(
        mail_pb2.SendMailBatchRequest(template_name="greet", entries=entries, **fields),
        metadata=SUPERADMIN,
        timeout=30,
    )


def entry(to: str, **params: Any) -> mail_pb2.BatchEntry:
    return mail_pb2.BatchEntry(to=[to], parameters=struct(params))


def listed(server: Server) -> list[mail_pb2.Message]:
    reply = server.mail.ListMessages(mail_pb2.ListMessagesRequest(), metadata=ADMIN, timeout=10)
    return list(reply.messages)


def test_a_batch_is_queued_and_delivered_entry_by_entry(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = batch_server(server_factory, smtp_sink)
    names = ["Ann", "Bo", "Cy"]
    reply = batch(server, [entry(f"{n.lower()}@example.com", name=n) for n in names])
    assert [r.status for r in reply.results] == [S.MESSAGE_STATUS_QUEUED] * 3
    assert len({r.id for r in reply.results}) == 3
    received = smtp_sink.wait_for(3)
    assert sorted(body(r.message) for r in received) == [f"Dear {n}" for n in names]
    assert {r.rcpt_tos[0]: str(r.message["Subject"]) for r in received} == {
        f"{n.lower()}@example.com": f"Hello {n}" for n in names
    }

    def all_sent() -> bool:
        return all(m.status == S.MESSAGE_STATUS_SENT for m in listed(server))

    wait_until(all_sent, 10, "every entry SENT")
    assert {m.template_name for m in listed(server)} == {"greet"}


def test_one_bad_entry_refuses_the_whole_batch_naming_its_fields(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = batch_server(server_factory, smtp_sink)
    entries = [entry(f"ok{i}@example.com", name="x") for i in range(8)]
    entries[3] = entry("not an address", name="x")
    entries[7] = entry("ok7@example.com", name=42)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, batch, server, entries)
    violations = details(err)["violations"]
    assert set(violations) == {"entries[3].to[0]", "entries[7].parameters.name"}, violations
    assert listed(server) == []
    smtp_sink.expect_no_more(within=0.5)
    assert smtp_sink.received == []


def test_entries_must_number_1_to_1000(server_factory: ServerFactory, smtp_sink: SmtpSink) -> None:
    server = batch_server(server_factory, smtp_sink)
    for entries in ([], [entry("a@example.com", name="x")] * 1001):
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, batch, server, entries)
        assert list(details(err)["violations"]) == ["entries"]
    assert listed(server) == []


def test_a_batch_is_idempotent_as_a_whole(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = batch_server(server_factory, smtp_sink)
    entries = [entry("a@example.com", name="A"), entry("b@example.com", name="B")]
    first = batch(server, entries, idempotency_key="b-1")
    assert batch(server, entries, idempotency_key="b-1") == first
    assert len(smtp_sink.wait_for(2)) == 2
    smtp_sink.expect_no_more(within=0.5)
    assert len(listed(server)) == 2
