"""MailService: proto in, compose and mailer calls, proto out."""

from __future__ import annotations

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from mailsvc.api.callstate import current_call
from mailsvc.auth import require_send_mail
from mailsvc.compose import MailRequest, check_mail, compose_templated, sender_of, template_for
from mailsvc.config import Config
from mailsvc.errors import InvalidArgument
from mailsvc.idempotency import IdempotencyStore, fingerprint
from mailsvc.mailer import Mailer
from mailsvc.message import Mail
from mailsvc.metrics import Metrics
from mailsvc.store import SettingsStore, Snapshot
from mailsvc.transports.base import Delivery
from mailsvc.v1 import mail_pb2 as pb
from mailsvc.v1 import mail_pb2_grpc


def _fingerprint(method: str, request: Message) -> str:
    without_key = type(request)()
    without_key.CopyFrom(request)
    without_key.ClearField("idempotency_key")
    return fingerprint(method, without_key.SerializeToString(deterministic=True))


def _response(delivery: Delivery) -> pb.SendMailResponse:
    return pb.SendMailResponse(
        message_id=delivery.message_id,
        transport=delivery.transport,
        recipients=delivery.recipients,
    )


MAX_KEY_LENGTH = 256


class MailServicer(mail_pb2_grpc.MailServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        config: Config,
        store: SettingsStore,
        mailer: Mailer,
        idempotency: IdempotencyStore,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._config = config
        self._store = store
        self._mailer = mailer
        self._idempotency = idempotency

    async def _deliver(
        self,
        method: str,
        request: pb.SendMailRequest | pb.SendTemplatedMailRequest,
        mail: Mail,
        snapshot: Snapshot,
        context: grpc.aio.ServicerContext,
    ) -> pb.SendMailResponse:
        call = current_call()
        key = request.idempotency_key
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument.one("idempotency_key", f"at most {MAX_KEY_LENGTH} characters")

        async def send() -> pb.SendMailResponse:
            delivery = await self._mailer.send(snapshot, mail, timeout=context.time_remaining())
            return _response(delivery)

        async def send_recorded() -> bytes:
            return (await send()).SerializeToString()

        if key:
            data, replayed = await self._idempotency.run(
                call.principal.sub, key, _fingerprint(method, request), send_recorded
            )
            if replayed:
                self._metrics.replays.inc()
            response = pb.SendMailResponse.FromString(data)
        else:
            response = await send()
        call.message_id = response.message_id
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
        return await self._deliver("SendMail", request, mail, snapshot, context)

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
        return await self._deliver("SendTemplatedMail", request, mail, snapshot, context)

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
