"""SuppressionService: the addresses no mail is sent to (admin and superadmin)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from google.protobuf import empty_pb2

from mailsvc import lifecycle
from mailsvc.addresses import parse_address
from mailsvc.api import convert
from mailsvc.api.callstate import current_call
from mailsvc.auth import require_admin
from mailsvc.errors import FieldViolation, InvalidArgument, NotFound
from mailsvc.lifecycle import PageTokens
from mailsvc.sending import SuppressionCache
from mailsvc.storage.base import Storage, Suppression
from mailsvc.suppression import SuppressionReason, normalize_address
from mailsvc.v1 import suppression_pb2 as spb
from mailsvc.v1 import suppression_pb2_grpc

MAX_DETAIL_CHARS = 1000
_LISTING = ("suppressions",)  # what page tokens of this listing are bound to


class SuppressionServicer(suppression_pb2_grpc.SuppressionServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        storage: Storage,
        cache: SuppressionCache,
        page_tokens: PageTokens,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._cache = cache
        self._tokens = page_tokens
        self._clock = clock

    async def ListSuppressions(
        self, request: spb.ListSuppressionsRequest, context: grpc.aio.ServicerContext
    ) -> spb.ListSuppressionsResponse:
        require_admin(current_call().principal, "list suppressions")
        size = lifecycle.page_size(request.page_size)
        position = self._tokens.decode(request.page_token, _LISTING)
        after = position[1] if position else ""
        rows = await self._storage.list_suppressions(page_size=size + 1, after=after)
        page = rows[:size]
        token = self._tokens.encode(_LISTING, (0.0, page[-1].address)) if len(rows) > size else ""
        return spb.ListSuppressionsResponse(
            suppressions=[convert.suppression(s) for s in page], next_page_token=token
        )

    async def AddSuppression(
        self, request: spb.AddSuppressionRequest, context: grpc.aio.ServicerContext
    ) -> spb.Suppression:
        require_admin(current_call().principal, "add suppressions")
        entry = request.suppression
        violations: list[FieldViolation] = []
        address = parse_address(entry.address, "suppression.address", violations)
        if entry.reason not in SuppressionReason._value2member_map_:
            violations.append(FieldViolation("suppression.reason", "not a suppression reason"))
        if len(entry.detail) > MAX_DETAIL_CHARS:
            violations.append(
                FieldViolation("suppression.detail", f"at most {MAX_DETAIL_CHARS} characters")
            )
        if violations or address is None:
            raise InvalidArgument(violations)
        reason = entry.reason or SuppressionReason.MANUAL
        stored = await self._storage.add_suppression(
            Suppression(
                address=normalize_address(address),
                reason=int(reason),
                create_time=self._clock(),
                detail=entry.detail,
            )
        )
        self._cache.note_added()
        return convert.suppression(stored)

    async def DeleteSuppression(
        self, request: spb.DeleteSuppressionRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        require_admin(current_call().principal, "delete suppressions")
        if not request.address.strip():
            raise InvalidArgument.one("address", "required")
        if not await self._storage.delete_suppression(normalize_address(request.address)):
            raise NotFound(
                f"{request.address!r} is not on the suppression list",
                reason="SUPPRESSION_NOT_FOUND",
            )
        return empty_pb2.Empty()
