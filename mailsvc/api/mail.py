"""MailService: proto in, compose / accept / records calls, proto out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from mailsvc import lifecycle
from mailsvc.api import convert
from mailsvc.api.callstate import current_call
from mailsvc.auth import Principal, require_send_mail
from mailsvc.compose import MailRequest, check_mail, compose_templated, sender_of, template_for
from mailsvc.config import Config
from mailsvc.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from mailsvc.idempotency import IdempotencyStore, fingerprint
from mailsvc.lifecycle import PageTokens, Plan
from mailsvc.message import Mail
from mailsvc.metrics import Metrics
from mailsvc.sending import Accepted, Keep, KeyEntry, Outgoing, Sender
from mailsvc.storage.base import Event, ListQuery, MessageRecord, Status, Storage
from mailsvc.store import SettingsBackend, Snapshot
from mailsvc.v1 import mail_pb2 as pb
from mailsvc.v1 import mail_pb2_grpc

MAX_KEY_LENGTH = 256
MAX_BATCH_ENTRIES = 1000

Reply = pb.SendMailResponse | pb.SendMailBatchResponse


def _fingerprint(method: str, request: Message) -> str:
    without_key = type(request)()
    without_key.CopyFrom(request)
    without_key.ClearField("idempotency_key")
    return fingerprint(method, without_key.SerializeToString(deterministic=True))


def _not_found(id: str) -> NotFound:
    return NotFound(f"no message with id {id!r}", reason="MESSAGE_NOT_FOUND")


def _status_filter(value: int) -> Status | None:
    try:
        status = Status(value)
    except ValueError:
        raise InvalidArgument.one("status", f"{value} is not a message status") from None
    return None if status is Status.UNSPECIFIED else status


class MailServicer(mail_pb2_grpc.MailServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        config: Config,
        store: SettingsBackend,
        sender: Sender,
        storage: Storage,
        idempotency: IdempotencyStore,
        metrics: Metrics,
        page_tokens: PageTokens,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._config = config
        self._store = store
        self._sender = sender
        self._storage = storage
        self._idempotency = idempotency
        self._tokens = page_tokens
        self._clock = clock
        self._watches: dict[asyncio.Task[object] | None, AsyncIterator[Event]] = {}
        self._draining = False

    # --- sending

    def _plan(
        self,
        request: pb.SendMailRequest | pb.SendTemplatedMailRequest | pb.SendMailBatchRequest,
        *,
        queue: bool,
    ) -> Plan | None:
        send_at = convert.seconds(request.send_at) if request.HasField("send_at") else None
        return lifecycle.plan(now=self._clock(), queue=queue, send_at=send_at)

    async def _accept(
        self,
        method: str,
        request: pb.SendMailRequest | pb.SendTemplatedMailRequest | pb.SendMailBatchRequest,
        batch: Sequence[Outgoing],
        plan: Plan | None,
        snapshot: Snapshot,
        context: grpc.aio.ServicerContext,
        build: Callable[[list[Accepted]], Reply],
    ) -> bytes | Reply:
        call = current_call()
        principal = call.principal
        key = request.idempotency_key
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument.one("idempotency_key", f"at most {MAX_KEY_LENGTH} characters")
        timeout = context.time_remaining()

        async def accept(keep: Keep | None) -> list[Accepted]:
            return await self._sender.accept(
                principal, snapshot, batch, plan=plan, timeout=timeout, keep=keep
            )

        if not key:
            return build(await accept(None))
        fp = _fingerprint(method, request)
        kept: list[bytes] = []

        def keep(accepted: list[Accepted]) -> KeyEntry:
            kept.append(build(accepted).SerializeToString())
            return (principal.sub, key, fp, kept[-1])

        async def first() -> bytes:
            accepted = await accept(keep)
            return kept[-1] if kept else build(accepted).SerializeToString()

        data, replayed = await self._idempotency.run(principal.sub, key, fp, first, recorded=True)
        if replayed:
            self._metrics.replays.inc()
        return data

    @staticmethod
    def _one(accepted: list[Accepted]) -> pb.SendMailResponse:
        return convert.response(accepted[0])

    async def _send_one(
        self,
        method: str,
        request: pb.SendMailRequest | pb.SendTemplatedMailRequest,
        outgoing: Outgoing,
        snapshot: Snapshot,
        context: grpc.aio.ServicerContext,
    ) -> pb.SendMailResponse:
        plan = self._plan(request, queue=request.queue)
        reply = await self._accept(method, request, [outgoing], plan, snapshot, context, self._one)
        response = pb.SendMailResponse.FromString(reply) if isinstance(reply, bytes) else reply
        assert isinstance(response, pb.SendMailResponse)
        current_call().message_id = response.message_id or response.id
        return response

    async def SendMail(
        self, request: pb.SendMailRequest, context: grpc.aio.ServicerContext
    ) -> pb.SendMailResponse:
        call = current_call()
        snapshot = self._store.snapshot
        settings = snapshot.settings
        require_send_mail(call.principal, settings)
        mail = check_mail(
            MailRequest(
                to=list(request.to),
                cc=list(request.cc),
                bcc=list(request.bcc),
                subject=request.subject,
                text=request.text,
                html=request.html,
                reply_to=request.reply_to,
                attachments=[
                    (a.filename, a.content_type, a.content, a.content_id)
                    for a in request.attachments
                ],
                sender=sender_of(settings, self._config),
            )
        )
        return await self._send_one("SendMail", request, Outgoing(mail=mail), snapshot, context)

    async def _templated(
        self, snapshot: Snapshot, request: pb.SendTemplatedMailRequest | pb.RenderTemplateRequest
    ) -> Mail:
        template = template_for(snapshot, request.template_name, current_call().principal)
        return await compose_templated(
            snapshot,
            self._config,
            template,
            json_format.MessageToDict(request.parameters),
            to=list(request.to),
            cc=list(request.cc),
            bcc=list(request.bcc),
        )

    async def SendTemplatedMail(
        self, request: pb.SendTemplatedMailRequest, context: grpc.aio.ServicerContext
    ) -> pb.SendMailResponse:
        snapshot = self._store.snapshot
        mail = await self._templated(snapshot, request)
        outgoing = Outgoing(mail=mail, template_name=request.template_name)
        return await self._send_one("SendTemplatedMail", request, outgoing, snapshot, context)

    async def RenderTemplate(
        self, request: pb.RenderTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenderedMail:
        mail = await self._templated(self._store.snapshot, request)
        return pb.RenderedMail(
            from_address=str(mail.sender),
            to=[str(a) for a in mail.to],
            cc=[str(a) for a in mail.cc],
            bcc=[str(a) for a in mail.bcc],
            subject=mail.subject,
            text=mail.text,
            html=mail.html,
        )

    async def SendMailBatch(
        self, request: pb.SendMailBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SendMailBatchResponse:
        snapshot = self._store.snapshot
        name = request.template_name
        template = template_for(snapshot, name, current_call().principal)
        if not 1 <= len(request.entries) <= MAX_BATCH_ENTRIES:
            raise InvalidArgument.one("entries", f"1 to {MAX_BATCH_ENTRIES} entries are required")
        plan = self._plan(request, queue=True)
        assert plan is not None
        batch: list[Outgoing] = []
        violations: list[FieldViolation] = []
        for i, entry in enumerate(request.entries):
            try:
                mail = await compose_templated(
                    snapshot,
                    self._config,
                    template,
                    json_format.MessageToDict(entry.parameters),
                    to=list(entry.to),
                    cc=list(entry.cc),
                    bcc=list(entry.bcc),
                )
            except InvalidArgument as exc:
                violations.extend(
                    FieldViolation(f"entries[{i}].{v.field}", v.description) for v in exc.violations
                )
                continue
            batch.append(Outgoing(mail=mail, template_name=name))
        if violations:
            raise InvalidArgument(violations)

        def build(accepted: list[Accepted]) -> pb.SendMailBatchResponse:
            return pb.SendMailBatchResponse(results=[convert.response(a) for a in accepted])

        reply = await self._accept("SendMailBatch", request, batch, plan, snapshot, context, build)
        if isinstance(reply, bytes):
            return pb.SendMailBatchResponse.FromString(reply)
        assert isinstance(reply, pb.SendMailBatchResponse)
        return reply

    # --- records

    async def _visible(self, id: str, principal: Principal) -> MessageRecord:
        if not id:
            raise InvalidArgument.one("id", "required: the id of a message")
        record = await self._storage.get(id)
        if record is None or not lifecycle.can_see(principal, record.caller):
            raise _not_found(id)
        return record

    async def GetMessage(
        self, request: pb.GetMessageRequest, context: grpc.aio.ServicerContext
    ) -> pb.Message:
        record = await self._visible(request.id, current_call().principal)
        return convert.message(record)

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        principal = current_call().principal
        size = lifecycle.page_size(request.page_size)
        caller = lifecycle.list_caller(principal, request.caller)
        status = _status_filter(request.status)
        recipient = request.recipient.strip().lower()
        filter = (caller, int(status or 0), recipient)
        after = self._tokens.decode(request.page_token, filter)
        rows = await self._storage.list_messages(
            ListQuery(
                page_size=size + 1, after=after, status=status, recipient=recipient, caller=caller
            )
        )
        page = rows[:size]
        token = ""
        if len(rows) > size:
            token = self._tokens.encode(filter, (page[-1].create_time, page[-1].id))
        return pb.ListMessagesResponse(
            messages=[convert.message(r) for r in page], next_page_token=token
        )

    async def CancelMessage(
        self, request: pb.CancelMessageRequest, context: grpc.aio.ServicerContext
    ) -> pb.Message:
        await self._visible(request.id, current_call().principal)
        record, event = await self._storage.cancel(request.id, now=self._clock())
        if record is None:
            raise _not_found(request.id)
        if event is None:
            raise FailedPrecondition(
                f"the message is {record.status.name}: only QUEUED or SCHEDULED ones can be "
                "cancelled",
                reason="MESSAGE_NOT_CANCELLABLE",
            )
        return convert.message(record)

    # --- watching

    async def WatchMessages(
        self, request: pb.WatchMessagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MessageEvent]:
        principal = current_call().principal
        if self._draining:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        events = self._storage.events()  # before the look-up: no event falls in between
        task: asyncio.Task[object] | None = asyncio.current_task()
        self._watches[task] = events
        try:
            if request.id:
                await self._visible(request.id, principal)
            # Headers now, not with the first event: a client knows the watch is live.
            await context.send_initial_metadata(())
            async for event in events:
                if lifecycle.watch_sees(principal, event, request.id):
                    yield convert.event(event)
        finally:
            self._watches.pop(task, None)
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        if self._draining:
            raise Unavailable("the server is shutting down; watch again", reason="SHUTTING_DOWN")

    def end_watches(self) -> None:
        """Shutdown: end every watch now, so the drain does not wait out its grace for them."""
        self._draining = True
        for task, events in list(self._watches.items()):
            close = getattr(events, "close", None)
            if callable(close):
                close()
            elif task is not None:
                task.cancel()
