"""Mailer keeps transports per settings version: an old snapshot never closes newer ones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from mailsvc.v1.settings_pb2 import MailSettings, SettingsAcl, SmtpSettings

from mailsvc.addresses import Address
from mailsvc.config import Config
from mailsvc.mailer import Mailer
from mailsvc.message import Mail
from mailsvc.metrics import Metrics
from mailsvc.store import Snapshot
from tests.conftest import free_port


class Counting:
    def __init__(self) -> None:
        self.connections = 0
        self.mails = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails += 1
        return "250 OK"


@pytest.fixture
def sinks() -> Iterator[list[tuple[Counting, int]]]:
    started = []
    for _ in range(2):
        handler, port = Counting(), free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        controller.start()
        started.append((controller, handler, port))
    yield [(handler, port) for _, handler, port in started]
    for controller, _, _ in started:
        controller.stop()


def snapshot(etag: str, port: int) -> Snapshot:
    settings = MailSettings(smtp=SmtpSettings(host="127.0.0.1", port=port))
    return Snapshot(settings, etag, SettingsAcl())


MAIL = Mail(sender=Address("", "s@example.com"), to=(Address("", "t@example.com"),), text="t")


def test_alternating_old_and_new_snapshots_keep_the_new_pool(
    sinks: list[tuple[Counting, int]],
) -> None:
    (old_sink, old_port), (new_sink, new_port) = sinks
    old, new = snapshot("old", old_port), snapshot("new", new_port)

    async def run() -> None:
        mailer = Mailer(Config(), Metrics(), current_etag=lambda: "new")
        for snap in (new, old, new, old, new):
            await mailer.send(snap, MAIL, timeout=5)
        await mailer.aclose()

    asyncio.run(run())
    assert (new_sink.mails, old_sink.mails) == (3, 2)
    assert new_sink.connections == 1  # one pooled connection, never closed by the old snapshot
    assert old_sink.connections == 2  # an outdated version lives only for its own send


def test_newer_settings_retire_the_old_transports(sinks: list[tuple[Counting, int]]) -> None:
    (first_sink, first_port), (second_sink, second_port) = sinks
    current = ["first"]

    async def run() -> None:
        mailer = Mailer(Config(), Metrics(), current_etag=lambda: current[0])
        await mailer.send(snapshot("first", first_port), MAIL, timeout=5)
        await mailer.send(snapshot("first", first_port), MAIL, timeout=5)
        current[0] = "second"
        await mailer.send(snapshot("second", second_port), MAIL, timeout=5)
        await mailer.send(snapshot("second", second_port), MAIL, timeout=5)
        await mailer.aclose()

    asyncio.run(run())
    assert (first_sink.mails, first_sink.connections) == (2, 1)
    assert (second_sink.mails, second_sink.connections) == (2, 1)
