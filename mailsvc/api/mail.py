"""MailService: proto in, compose and mailer calls, proto out."""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from mailsvc.api.interceptors import current_call
from mailsvc.auth import can_send_mail
from mailsvc.compose import MailRequest, check_mail, compose_templated, sender_of, template_for
from mailsvc.config import Config
from mailsvc.errors import PermissionDenied
from mailsvc.mailer import Mailer
from mailsvc.message import Mail
from mailsvc.store import SettingsStore
from mailsvc.transports.base import Delivery
from mailsvc.v1 import mail_pb2 as pb
from mailsvc.v1 import mail_pb2_grpc


def _response(delivery: Delivery) -> pb.SendMailResponse:
    return pb.SendMailResponse(
        message_id=delivery.message_id,
        transport=delivery.transport,
        recipients=delivery.recipients,
    )


class MailServicer(mail_pb2_grpc.MailServiceServicer):  # type: ignore[misc]
    def __init__(self, config: Config, store: SettingsStore, mailer: Mailer) -> None:
        self._config = config
        self._store = store
        self._mailer = mailer

    async def SendMail(
        self, request: pb.SendMailRequest, context: grpc.aio.ServicerContext
    ) -> pb.SendMailResponse:
        call = current_call()
        snapshot = self._store.snapshot
        settings = snapshot.settings
        if not can_send_mail(
            call.principal,
            enable_user_full_access=settings.enable_user_full_access,
            authorized_roles=settings.authorized_roles,
        ):
            raise PermissionDenied(f"caller {call.principal.sub!r} may not send mail")
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
        delivery = await self._mailer.send(snapshot, mail, timeout=context.time_remaining())
        call.message_id = delivery.message_id
        return _response(delivery)

    def _templated(self, request: pb.SendTemplatedMailRequest | pb.RenderTemplateRequest) -> Mail:
        snapshot = self._store.snapshot
        template = template_for(snapshot, request.template_name, current_call().principal)
        return compose_templated(
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
        mail = self._templated(request)
        snapshot = self._store.snapshot
        delivery = await self._mailer.send(snapshot, mail, timeout=context.time_remaining())
        current_call().message_id = delivery.message_id
        return _response(delivery)

    async def RenderTemplate(
        self, request: pb.RenderTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenderedMail:
        mail = self._templated(request)
        return pb.RenderedMail(
            from_address=str(mail.sender),
            to=[str(a) for a in mail.to],
            cc=[str(a) for a in mail.cc],
            bcc=[str(a) for a in mail.bcc],
            subject=mail.subject,
            text=mail.text,
            html=mail.html,
        )
