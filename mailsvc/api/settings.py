"""SettingsService: proto in, store call, proto out."""

from __future__ import annotations

import grpc

from mailsvc import settings as rules
from mailsvc.api.callstate import current_call
from mailsvc.auth import (
    can_read_settings,
    require_settings_read,
    require_settings_update,
    require_superadmin,
)
from mailsvc.errors import Aborted
from mailsvc.store import SettingsBackend, Snapshot
from mailsvc.v1 import settings_pb2 as pb
from mailsvc.v1 import settings_pb2_grpc


def _response(snapshot: Snapshot) -> pb.MailSettings:
    out = rules.redact(snapshot.settings)
    out.etag = snapshot.etag
    return out


def _write_response(snapshot: Snapshot) -> pb.MailSettings:
    """After a write: the settings for callers who may read them, else only the etag."""
    if can_read_settings(current_call().principal, snapshot.acl):
        return _response(snapshot)
    return pb.MailSettings(etag=snapshot.etag)


class SettingsServicer(settings_pb2_grpc.SettingsServiceServicer):  # type: ignore[misc]
    def __init__(self, store: SettingsBackend) -> None:
        self._store = store

    async def GetMailSettings(
        self, request: pb.GetMailSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MailSettings:
        snapshot = self._store.snapshot
        require_settings_read(current_call().principal, snapshot.acl)
        return _response(snapshot)

    async def UpdateMailSettings(
        self, request: pb.UpdateMailSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MailSettings:
        snapshot = self._store.snapshot
        require_settings_update(current_call().principal, snapshot.acl)
        if rules.names_only_output_fields(request.update_mask):
            if request.etag and request.etag != snapshot.etag:
                raise Aborted("etag does not match the stored settings: read them again and retry")
            return _write_response(snapshot)
        snapshot = await self._store.update(
            lambda current: rules.apply_update(current, request.settings, request.update_mask),
            request.etag,
        )
        return _write_response(snapshot)

    async def DeleteMailSettings(
        self, request: pb.DeleteMailSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MailSettings:
        require_settings_update(current_call().principal, self._store.snapshot.acl, "delete")
        snapshot = await self._store.update(lambda current: pb.MailSettings(), request.etag)
        return _write_response(snapshot)

    async def GetSettingsAcl(
        self, request: pb.GetSettingsAclRequest, context: grpc.aio.ServicerContext
    ) -> pb.SettingsAcl:
        require_superadmin(current_call().principal, "read the settings ACL")
        return self._store.snapshot.acl

    async def UpdateSettingsAcl(
        self, request: pb.UpdateSettingsAclRequest, context: grpc.aio.ServicerContext
    ) -> pb.SettingsAcl:
        require_superadmin(current_call().principal, "update the settings ACL")
        snapshot = await self._store.update_acl(request.acl)
        return snapshot.acl
