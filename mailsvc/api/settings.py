"""SettingsService: proto in, store call, proto out."""

from __future__ import annotations

import grpc

from mailsvc import settings as rules
from mailsvc.api.interceptors import current_call
from mailsvc.auth import require
from mailsvc.store import SettingsStore, Snapshot
from mailsvc.v1 import settings_pb2 as pb
from mailsvc.v1 import settings_pb2_grpc


def _response(snapshot: Snapshot) -> pb.MailSettings:
    out = rules.redact(snapshot.settings)
    out.etag = snapshot.etag
    return out


class SettingsServicer(settings_pb2_grpc.SettingsServiceServicer):  # type: ignore[misc]
    def __init__(self, store: SettingsStore) -> None:
        self._store = store

    async def GetMailSettings(
        self, request: pb.GetMailSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MailSettings:
        snapshot = self._store.snapshot
        require(current_call().principal, snapshot.acl.read_roles, "read the mail settings")
        return _response(snapshot)

    async def UpdateMailSettings(
        self, request: pb.UpdateMailSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MailSettings:
        acl = self._store.snapshot.acl
        require(current_call().principal, acl.update_roles, "update the mail settings")
        snapshot = await self._store.update(
            lambda current: rules.apply_update(current, request.settings, request.update_mask),
            request.etag,
        )
        return _response(snapshot)

    async def DeleteMailSettings(
        self, request: pb.DeleteMailSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MailSettings:
        acl = self._store.snapshot.acl
        require(current_call().principal, acl.update_roles, "delete the mail settings")
        snapshot = await self._store.update(lambda current: pb.MailSettings(), request.etag)
        return _response(snapshot)

    async def GetSettingsAcl(
        self, request: pb.GetSettingsAclRequest, context: grpc.aio.ServicerContext
    ) -> pb.SettingsAcl:
        require(current_call().principal, [], "read the settings ACL")
        return self._store.snapshot.acl

    async def UpdateSettingsAcl(
        self, request: pb.UpdateSettingsAclRequest, context: grpc.aio.ServicerContext
    ) -> pb.SettingsAcl:
        require(current_call().principal, [], "update the settings ACL")
        snapshot = await self._store.update_acl(request.acl)
        return snapshot.acl
