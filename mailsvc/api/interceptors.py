"""One interceptor for every RPC of ours: authenticate, map errors to status, log access."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from mailsvc.api.status import internal_status, to_status
from mailsvc.auth import Principal, TokenVerifier
from mailsvc.errors import MailsvcError, Unavailable
from mailsvc.metrics import Metrics

log = logging.getLogger("mailsvc.access")
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass
class CallInfo:
    """Per-call facts the servicer and the access log share."""

    principal: Principal
    message_id: str = ""


_call: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("mailsvc_call")


def current_call() -> CallInfo:
    return _call.get()


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return str(value)
    return None


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, verifier: TokenVerifier, metrics: Metrics) -> None:
        self._verifier = verifier
        self._metrics = metrics
        self.draining = False  # set at shutdown: calls not yet started are refused
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or method.startswith(_PUBLIC_PREFIXES):
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with authentication, error mapping, metrics and the access log."""
        inner = handler.unary_unary
        verifier = self._verifier
        name = method.lstrip("/")
        rpcs = self._metrics.rpcs
        latency = self._metrics.rpc_seconds.labels(name)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            info: CallInfo | None = None
            try:
                if self.draining:
                    raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
                authorization = _authorization(context.invocation_metadata())
                info = CallInfo(verifier.principal(authorization))
                _call.set(info)
                return await inner(request, context)
            except MailsvcError as exc:
                code = exc.code
                status = to_status(exc)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("unexpected error in %s", method)
                status = internal_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                elapsed = time.perf_counter() - start
                rpcs.labels(name, code).inc()
                latency.observe(elapsed)
                fields = {
                    "method": name,
                    "caller": info.principal.sub if info else "-",
                    "code": code,
                    "duration_ms": round(elapsed * 1000, 2),
                    "message_id": (info.message_id if info else "") or "-",
                }
                log.info(
                    "rpc method=%s caller=%s code=%s duration_ms=%s message_id=%s",
                    *fields.values(),
                    extra=fields,
                )

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
