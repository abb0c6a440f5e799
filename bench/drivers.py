"""One call of each scenario, as the load generator makes it: `await driver.call()`."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Protocol

import aiohttp
import aiosmtplib
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailsvc.v1 import mail_pb2, mail_pb2_grpc

from bench import workload

CALL_TIMEOUT = 30.0
SMTP_CONNECTIONS = 4


class Driver(Protocol):
    async def call(self) -> None: ...

    async def aclose(self) -> None: ...


class UnexpectedReply(Exception):
    """The call succeeded but did not answer what it should have."""


class GrpcDriver:
    """Health/Check, SendMail (now or queued), SendTemplatedMail or ListMessages, one channel."""

    def __init__(self, target: str, method: str, *, token: str, transport: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._transport = transport
        self._metadata: tuple[tuple[str, str], ...] | None = (("authorization", f"Bearer {token}"),)
        self._request: Any
        self._status = mail_pb2.MESSAGE_STATUS_SENT
        self._calls = itertools.count()
        if method == "noop":
            self._rpc = health_pb2_grpc.HealthStub(self._channel).Check
            self._request = health_pb2.HealthCheckRequest()
            self._metadata = None
        elif method == "send":
            self._rpc = mail_pb2_grpc.MailServiceStub(self._channel).SendMail
            self._request = workload.send_mail_request()
        elif method in ("queue", "backlog"):
            self._rpc = mail_pb2_grpc.MailServiceStub(self._channel).SendMail
            subject = workload.QUEUED_SUBJECT if method == "queue" else workload.BACKLOG_SUBJECT
            self._request = workload.send_mail_request(queue=True, subject=subject)
            self._status = mail_pb2.MESSAGE_STATUS_QUEUED
        elif method == "list":
            self._rpc = mail_pb2_grpc.MailServiceStub(self._channel).ListMessages
            self._request = None  # one per call: the recipient changes
        elif method == "templated":
            self._rpc = mail_pb2_grpc.MailServiceStub(self._channel).SendTemplatedMail
            self._request = workload.templated_request()
        else:
            raise ValueError(f"unknown gRPC method {method!r}")

    async def call(self) -> None:
        if self._request is None:
            request = workload.list_request(next(self._calls))
            reply = await self._rpc(request, metadata=self._metadata, timeout=CALL_TIMEOUT)
            if len(reply.messages) != workload.LIST_PAGE:
                raise UnexpectedReply(f"a page of {len(reply.messages)} records")
            return
        reply = await self._rpc(self._request, metadata=self._metadata, timeout=CALL_TIMEOUT)
        if self._transport and reply.transport != self._transport:
            raise UnexpectedReply(f"sent by {reply.transport!r}, not {self._transport!r}")
        if self._metadata and reply.status != self._status:
            raise UnexpectedReply(f"status {reply.status}, not {self._status}")

    async def aclose(self) -> None:
        await self._channel.close()


class SmtpDriver:
    """The SMTP sink driven directly over a few reused aiosmtplib connections.

    Calls take the connections in turn, each behind a lock: asyncio.Lock serves its waiters
    first in, first out, so no call starves (a shared queue of connections lets the caller
    that just gave one back take it again, and the tail latency would be the queue's).
    """

    def __init__(self, clients: list[aiosmtplib.SMTP]) -> None:
        self._clients = clients
        self._locks = [asyncio.Lock() for _ in clients]
        self._turn = itertools.cycle(range(len(clients)))
        self._raw = workload.raw_mime()

    @classmethod
    async def open(cls, target: str, connections: int) -> SmtpDriver:
        host, _, port = target.rpartition(":")
        clients = []
        for _ in range(connections):
            client = aiosmtplib.SMTP(
                hostname=host, port=int(port), start_tls=False, timeout=CALL_TIMEOUT
            )
            await client.connect()
            clients.append(client)
        return cls(clients)

    async def call(self) -> None:
        turn = next(self._turn)
        async with self._locks[turn]:
            await self._clients[turn].sendmail(workload.SENDER, [workload.RECIPIENT], self._raw)

    async def aclose(self) -> None:
        for client in self._clients:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


class HttpDriver:
    """The Mailgun stand-in driven directly with aiohttp over keep-alive connections."""

    def __init__(self, base_url: str, connections: int) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
        )
        self._url = f"{base_url}/v3/{workload.MAILGUN_DOMAIN}/messages"
        self._body = workload.mailgun_form()
        self._auth = aiohttp.BasicAuth("api", workload.MAILGUN_KEY)
        self._headers = {"Content-Type": "application/x-www-form-urlencoded"}

    async def call(self) -> None:
        async with self._session.post(
            self._url, data=self._body, auth=self._auth, headers=self._headers
        ) as response:
            if response.status != 200:
                raise UnexpectedReply(f"HTTP {response.status}")
            await response.json()

    async def aclose(self) -> None:
        await self._session.close()


async def open_driver(kind: str, target: str, *, concurrency: int, token: str) -> Driver:
    """kind: noop | send | queue | backlog | templated | list (gRPC, `target` host:port),
    smtp | http (direct)."""
    if kind == "smtp":
        return await SmtpDriver.open(target, min(SMTP_CONNECTIONS, concurrency))
    if kind == "http":
        return HttpDriver(target, concurrency)
    method, _, transport = kind.partition(":")
    return GrpcDriver(target, method, token=token, transport=transport)


def error_name(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    return type(exc).__name__
